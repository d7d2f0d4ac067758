.PHONY: setup demo test lint check bench bench-store bench-vrpc

setup:
	bash scripts/setup.sh

demo:
	bash scripts/setup.sh --no-guest && python3 -m prism serve --demo

test:
	bash scripts/setup.sh && python3 -m pytest -q

lint:
	ruff check . && ruff format --check . && mypy prism rpc vrpc

# Lint, then the tests that need no server process, QEMU or network namespace: the sans-IO
# cores (rpc, NLM, VRPC codecs), the lock manager, the journal and the code-shape checks.
# About a minute on a loaded 2-CPU machine; `make test` runs everything.
FAST_TESTS = \
	tests/test_rpc_message.py tests/test_rpc_record.py tests/test_rpc_admission.py \
	tests/test_rpc_server.py tests/test_rpc_portmap.py tests/test_rpc_transport.py \
	tests/test_nlm_xdr.py tests/test_nlm_locks.py tests/test_nlm_monitor.py \
	tests/test_vrpc_abi.py tests/test_vrpc_control.py tests/test_store_journal.py \
	tests/test_import_graph.py tests/test_one_home.py tests/test_dependencies.py

check: lint
	python3 -m pytest -q -p no:cacheprovider $(FAST_TESTS)

bench:
	bash benchmarks/setup.sh && python3 benchmarks/run.py

bench-store:
	python3 benchmarks/store_bench.py

bench-vrpc:
	python3 benchmarks/vrpc_bench.py
