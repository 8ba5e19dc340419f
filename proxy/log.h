/*
 * log.h — one line per event on stderr, PostgreSQL-style:
 *   2026-11-21 06:40:01.123 UTC [4711] LOG:  [S-17 app/alice@127.0.0.1:50312] connected
 *
 * Lines never carry secrets or literal SQL values: callers log identifiers, states,
 * counts and SQLSTATEs, never statement text or passwords.
 */
#ifndef PD_PROXY_LOG_H
#define PD_PROXY_LOG_H

#include "rules/config.h"

/* Sets the threshold; lines above it are dropped. Starts at PD_LOG_INFO. */
void pd_log_set_level(pd_log_level_t level);
bool pd_log_enabled(pd_log_level_t level);

/* Logs one line; `tag` is a context prefix such as "[S-17 app/alice@host:port]" or NULL. */
void pd_log(pd_log_level_t level, const char *tag, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define pd_log_error(tag, ...)   pd_log(PD_LOG_ERROR, tag, __VA_ARGS__)
#define pd_log_warning(tag, ...) pd_log(PD_LOG_WARNING, tag, __VA_ARGS__)
#define pd_log_info(tag, ...)    pd_log(PD_LOG_INFO, tag, __VA_ARGS__)
#define pd_log_debug(tag, ...)                                                                     \
    do {                                                                                           \
        if (pd_log_enabled(PD_LOG_DEBUG))                                                          \
            pd_log(PD_LOG_DEBUG, tag, __VA_ARGS__);                                                \
    } while (0)

#endif /* PD_PROXY_LOG_H */
