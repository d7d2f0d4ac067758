/* lockf: take a POSIX (fcntl) or BSD (flock) lock on FILE in the Prism test guest.
 *
 *   lockf [-n] [-s] [-b] FILE [SECONDS]
 *
 * -n: do not wait (F_SETLK / LOCK_NB); -s: shared lock (default exclusive); -b: flock(2)
 * instead of fcntl(2). Holds the lock for SECONDS (default 0), printing "locked" once it has
 * it. Exit status: 0 after holding it, 11 (EAGAIN) if -n found it taken, 1 on other errors.
 * Built static by the guest tests (busybox has no fcntl tool).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int nowait = 0, shared = 0, bsd = 0, opt;
    while ((opt = getopt(argc, argv, "nsb")) != -1) {
        if (opt == 'n') nowait = 1;
        else if (opt == 's') shared = 1;
        else if (opt == 'b') bsd = 1;
        else return 1;
    }
    if (optind >= argc) {
        fprintf(stderr, "usage: lockf [-n] [-s] [-b] FILE [SECONDS]\n");
        return 1;
    }
    int fd = open(argv[optind], shared ? O_RDONLY : O_RDWR);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    int rc;
    if (bsd) {
        rc = flock(fd, (shared ? LOCK_SH : LOCK_EX) | (nowait ? LOCK_NB : 0));
    } else {
        struct flock fl;
        memset(&fl, 0, sizeof fl);
        fl.l_type = shared ? F_RDLCK : F_WRLCK;
        fl.l_whence = SEEK_SET;
        rc = fcntl(fd, nowait ? F_SETLK : F_SETLKW, &fl);
    }
    if (rc != 0) {
        int err = errno;
        if (err == EAGAIN || err == EACCES || err == EWOULDBLOCK) return 11;
        fprintf(stderr, "lock: %s\n", strerror(err));
        return 1;
    }
    printf("locked\n");
    fflush(stdout);
    if (optind + 1 < argc) sleep((unsigned)atoi(argv[optind + 1]));
    return 0;
}
