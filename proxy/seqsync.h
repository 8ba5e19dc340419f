/*
 * seqsync.h — keeps sequences in step while a database's tables rules mirror writes.
 *
 * The mirror applies the rows that sequences and identities gave on the authoritative side
 * as row images with explicit values, so the mirror's own sequences never move. Once a
 * second, for every database with a tables rule at writes dual or dual-new, a libuv worker
 * thread sets each sequence of the mirror side at least as high as the authoritative
 * side's (setval; never lowered), over two connections kept open between rounds. A sequence
 * that exists on one side only is left alone. Switchover and rollback do the same step
 * once more while the database is paused, so nothing can be handed out twice after a flip.
 */
#ifndef PD_PROXY_SEQSYNC_H
#define PD_PROXY_SEQSYNC_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct pg_conn;
typedef struct pd_server pd_server_t;

#define PD_SEQSYNC_INTERVAL_MS 1000

/*
 * One round, blocking (worker threads only): every sequence of `to` that is lower than the
 * same-named sequence of `from` is set to from's value. Returns how many were set, or -1
 * with a one-line message in err.
 */
int pd_seqsync_round(struct pg_conn *from, struct pg_conn *to, char *err, size_t errlen);

/* One round over connections of its own (opened with a 5 s timeout, then closed), for
   switchover and rollback; the same outcome as pd_seqsync_round. */
int pd_seqsync_once(const char *from, const char *to, char *err, size_t errlen);

/* Starts the once-a-second rounds (the server calls it at start; databases and flags are
   read at each tick, so reloads and flag changes need nothing more). */
int pd_seqsync_start(pd_server_t *srv);

/* Stops them; a round in flight finishes on its thread and then frees its state. */
void pd_seqsync_stop(pd_server_t *srv);

/* For status: {"DB": {"sequences_set": N, "rounds": N, "last_round_ms_ago": N, "error":
   "..."}} for every database synced so far. */
json_t *pd_seqsync_status(const pd_server_t *srv);

/* Sequences set since start, over all databases (metrics). */
uint64_t pd_seqsync_total(const pd_server_t *srv);

#endif /* PD_PROXY_SEQSYNC_H */
