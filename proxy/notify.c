/*
 * notify.c — the sd_notify datagrams of notify.h, written by hand (see there for why).
 */
#include "proxy/notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "proxy/log.h"

#define NOTIFY_MSG_MAX 1024 /* reports are a few short lines */

struct pd_notify {
    int fd;
    struct sockaddr_un addr;
    socklen_t addr_len;
};

pd_notify_t *pd_notify_open(void)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (path == NULL || path[0] == '\0')
        return NULL;
    pd_notify_t *n = calloc(1, sizeof *n);
    if (n == NULL)
        return NULL;
    size_t len = strlen(path);
    /* A path must be absolute; "@name" is Linux's abstract namespace (a leading NUL). */
    if ((path[0] != '/' && path[0] != '@') || len >= sizeof n->addr.sun_path) {
        pd_log_warning(NULL,
                       "NOTIFY_SOCKET \"%s\" is not an absolute path or @name; not "
                       "reporting readiness to the service manager",
                       path);
        free(n);
        unsetenv("NOTIFY_SOCKET");
        return NULL;
    }
    n->addr.sun_family = AF_UNIX;
    memcpy(n->addr.sun_path, path, len);
    if (path[0] == '@')
        n->addr.sun_path[0] = '\0';
    n->addr_len =
        (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + (path[0] == '@' ? 0 : 1));
    unsetenv("NOTIFY_SOCKET");
    n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (n->fd < 0) {
        pd_log_warning(NULL, "could not make a socket to report to the service manager: %s",
                       strerror(errno));
        free(n);
        return NULL;
    }
    return n;
}

static void send_text(pd_notify_t *n, const char *text, size_t len)
{
    if (sendto(n->fd, text, len, MSG_NOSIGNAL, (const struct sockaddr *)&n->addr, n->addr_len) < 0)
        pd_log_debug(NULL, "could not report to the service manager: %s", strerror(errno));
}

void pd_notify_send(pd_notify_t *n, const char *fmt, ...)
{
    if (n == NULL)
        return;
    char text[NOTIFY_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (len < 0)
        return;
    send_text(n, text, (size_t)len < sizeof text ? (size_t)len : sizeof text - 1);
}

void pd_notify_reloading(pd_notify_t *n)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long usec =
        (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull;
    pd_notify_send(n, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading the configuration", usec);
}

void pd_notify_close(pd_notify_t *n)
{
    if (n == NULL)
        return;
    close(n->fd);
    free(n);
}
