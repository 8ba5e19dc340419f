/*
 * compare.h — comparing the two sides of a logical operation, and recording divergence.
 *
 * A result is summarised as it streams by, without keeping rows: the number of rows,
 * a hash of the rows (order-insensitive multiset hash, or an ordered chain when the query
 * has ORDER BY), the command tag and the SQLSTATE of an error. Two summaries differ when
 * any of these differ.
 *
 * The divergence log is JSON lines, one per event: time, rule, kind, the statement
 * normalized (literals replaced by $n: never raw values), both sides' outcomes, and the
 * key where known. Counters per rule go to status and metrics.
 */
#ifndef PD_PROXY_COMPARE_H
#define PD_PROXY_COMPARE_H

#include <jansson.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    bool ordered;
    uint64_t rows;
    uint64_t hash;    /* multiset: sum of row hashes; ordered: chained */
    char tag[64];     /* the last CommandComplete tag */
    char sqlstate[6]; /* "" unless an ErrorResponse came */
    EVP_MD_CTX *row;  /* hashing the DataRow in progress; owned */
    bool in_row;
} pd_result_sum_t;

bool pd_result_sum_init(pd_result_sum_t *r, bool ordered);
void pd_result_sum_free(pd_result_sum_t *r);
/* A DataRow's bytes as they pass, in any number of pieces: begin, feed, end. */
void pd_result_row_begin(pd_result_sum_t *r);
void pd_result_row_feed(pd_result_sum_t *r, const void *p, size_t n);
void pd_result_row_end(pd_result_sum_t *r);
void pd_result_tag(pd_result_sum_t *r, const char *tag);
void pd_result_error(pd_result_sum_t *r, const char *sqlstate);
/* True when both summaries describe the same outcome. */
bool pd_result_equal(const pd_result_sum_t *a, const pd_result_sum_t *b);

typedef struct pd_divergence_log pd_divergence_log_t;

/* Opens (appends to) the log; path NULL: events are counted but not written. NULL with
 * *err (malloc'd) when the file cannot be opened. */
pd_divergence_log_t *pd_divergence_open(const char *path, char **err);
void pd_divergence_close(pd_divergence_log_t *log);

/*
 * Appends one event. `sql` is the statement as the client sent it: it is normalized
 * here, so that no literal reaches the file. old/new describe the two outcomes; key (a
 * reference taken, may be NULL) the row concerned, {column: text value}, when known.
 */
void pd_divergence_record(pd_divergence_log_t *log, const char *rule, const char *kind,
                          const char *sql, const pd_result_sum_t *old_side,
                          const pd_result_sum_t *new_side, json_t *key);

/*
 * Reads the log's events, oldest first, from at most the last `window` bytes of the file
 * (a bounded read: a large log never stalls the loop), calling fn with each event that
 * parses as JSON (a borrowed reference). Returns true when the window cut the log, so
 * that older events were not read; false too when there is no file.
 */
#define PD_DIVERGENCE_WINDOW (4L << 20)
typedef void (*pd_divergence_fn)(json_t *event, void *ctx);
bool pd_divergence_scan(const char *path, long window, pd_divergence_fn fn, void *ctx);

#endif /* PD_PROXY_COMPARE_H */
