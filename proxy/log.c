/*
 * log.c — the log line writer. The level is the one piece of process-wide state pgdual
 * keeps outside its server context: it is set once at start and on reload, and every
 * module logs through here, relay threads included (the level is read atomically; each
 * line is one write()).
 */
#include "proxy/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static pd_log_level_t log_level = PD_LOG_INFO;

static const char *const level_names[] = {
    [PD_LOG_ERROR] = "ERROR",
    [PD_LOG_WARNING] = "WARNING",
    [PD_LOG_INFO] = "LOG",
    [PD_LOG_DEBUG] = "DEBUG",
};

void pd_log_set_level(pd_log_level_t level)
{
    __atomic_store_n(&log_level, level, __ATOMIC_RELAXED);
}

bool pd_log_enabled(pd_log_level_t level)
{
    return level <= __atomic_load_n(&log_level, __ATOMIC_RELAXED);
}

void pd_log(pd_log_level_t level, const char *tag, const char *fmt, ...)
{
    if (!pd_log_enabled(level))
        return;

    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    char when[32];
    strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);

    /* Build the whole line first so that one write() keeps lines from interleaving. */
    char line[2048];
    int n =
        snprintf(line, sizeof line, "%s.%03d UTC [%d] %s:  %s%s", when, (int)(tv.tv_usec / 1000),
                 (int)getpid(), level_names[level], tag ? tag : "", tag ? " " : "");
    if (n < 0)
        return;
    if ((size_t)n < sizeof line) {
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
        va_end(ap);
        if (m > 0)
            n += m;
    }
    if ((size_t)n >= sizeof line - 1)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w; /* nowhere to report a failing stderr */
}
