/*
 * cutover.h — the admin commands that move a database between old and new (DESIGN.md §1
 * blue/green steps 4-5, §3): `pause`, `resume`, `switchover`, `rollback`.
 *
 * pause DB [--timeout MS]: sessions of DB hold their next statement at a transaction
 *   boundary (transactions in flight finish); the reply comes when DB is quiet, or at the
 *   timeout with the sessions still busy. A pause always ends: on resume, at its timeout
 *   (default 10 s, also after it went quiet), or when the admin client that asked for it
 *   goes away before the reply.
 * switchover DB [--timeout MS] [--force] [--dry-run] [--max-verify-age S]:
 *   checks the guardrails (every rule of DB at writes=dual; mirrors connected and caught
 *   up; no divergence since the last passing verify; a passing verify no older than the
 *   maximum age), refusing when one fails or cannot be answered, unless --force; then
 *   pauses DB, waits until its sessions are between transactions and its mirrors have
 *   applied everything (abandoning and resuming unchanged after --timeout, default 5 s),
 *   sets new's sequences at least as high as old's, flips every rule of DB to
 *   writes=dual-new reads=new, and resumes. Sessions change sides at their next
 *   statement, connected. rollback DB: the same in reverse (dual-new back to dual, reads
 *   old; old's sequences brought up to new's).
 * switchover DB --watch DURATION [--max-divergence N] [--max-error-rate R]: after the flip
 *   the database is watched, and rolled back on its own when a threshold is passed
 *   (admin/watch.h). An operator's switchover or rollback of the database ends its watch.
 * With `state: postgres`, switchover and rollback run across the fleet (admin/fleet.h); pause
 * and resume stay this instance's own.
 * Every pause, resume, switchover and rollback is recorded in the state's history with
 * who asked and what was measured.
 */
#ifndef PD_ADMIN_CUTOVER_H
#define PD_ADMIN_CUTOVER_H

#include <jansson.h>

#include "admin/socket.h"
#include "admin/watch.h"
#include "proxy/server.h"

void pd_cmd_pause(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv);
json_t *pd_cmd_resume(pd_server_t *srv, int argc, char **argv);
/* switchover and rollback (argv[0] says which) */
void pd_cmd_switchover(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv);

/*
 * A rollback of the database on behalf of watch w (no admin client): its guardrails, pause,
 * drain (at most timeout_ms), sequences and flip, as `rollback DB --timeout timeout_ms`,
 * recorded as by `who`. 0 when started: pd_watch_rollback_done tells w how it ended. -1 when
 * it could not start (refused: a guardrail failed, the database is paused), msg says why.
 */
int pd_cutover_auto_rollback(pd_server_t *srv, pd_watch_t *w, const char *database, const char *who,
                             uint64_t timeout_ms, char *msg, size_t size);

/* Appends an operator event about a database to the state's history (a reference to fields
 * is taken): a state file at once, a shared state (PostgreSQL) off the event loop, events
 * in order. A state that cannot be written is logged, never fatal. */
void pd_cutover_record(pd_server_t *srv, const char *database, const char *who, const char *event,
                       json_t *fields);

/* The guardrails only this instance can answer (its divergence since the last verify,
 * its detached mirrors): true, or false with why (what failed and what to run). A
 * participant of a fleet switchover checks them before it acknowledges the pause. */
bool pd_cutover_local_ok(pd_server_t *srv, const char *database, bool rollback, char *why,
                         size_t size);

/* Are the database's sessions between transactions and its mirrors idle (nothing queued)? */
bool pd_cutover_drained(pd_server_t *srv, const char *database);

/* The sequence step of a switchover (rollback false) or rollback of the database: 1 with
 * *from and *to (malloc'd conninfos: to's sequences are brought up to from's), 0 when it
 * has none (no tables rule, or no new side), -1 when out of memory. */
int pd_cutover_seq_sides(const pd_server_t *srv, const char *database, bool rollback, char **from,
                         char **to);

/* Server shutdown: pauses end, operations in progress are abandoned (their clients told),
 * watches end (pd_watch_stop_all). */
void pd_cutover_stop_all(pd_server_t *srv);

#endif /* PD_ADMIN_CUTOVER_H */
