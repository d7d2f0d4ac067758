.PHONY: setup demo test lint bench bench-store bench-vrpc

setup:
	bash scripts/setup.sh

demo:
	bash scripts/setup.sh --no-guest && python3 -m prism serve --demo

test:
	bash scripts/setup.sh && python3 -m pytest -q

lint:
	ruff check . && ruff format --check . && mypy prism rpc vrpc

bench:
	bash benchmarks/setup.sh && python3 benchmarks/run.py

bench-store:
	python3 benchmarks/store_bench.py

bench-vrpc:
	python3 benchmarks/vrpc_bench.py
