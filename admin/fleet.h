/*
 * fleet.h — several pgdual instances sharing one state in PostgreSQL (`state: postgres`,
 * DESIGN.md §4 "Scaling past one machine").
 *
 * Each instance runs a member: a thread with a connection of its own to the control
 * schema (rules/state.h) that LISTENs on `pgdual_state` and `pgdual_fleet`, writes this
 * instance's heartbeat row (pgdual.instances: state version, sessions, queued mirror
 * writes) every second and reads the others'. A change of the shared state made through
 * any instance is read back by every member and its flags come into force at once (the
 * notification takes milliseconds; the heartbeat's version check catches a lost one
 * within a second).
 *
 * Switchover and rollback across the fleet: the coordinator (the instance whose admin
 * socket got the command) takes the fleet's advisory lock, refuses when an operation is
 * in progress, and records an operation in pgdual.operations naming every live instance
 * (heartbeat within PD_FLEET_LIVE_MS) as participant, phase `pause`. Each participant
 * pauses the database, drains it (transactions and mirror queues) and acknowledges in
 * pgdual.acks. With every acknowledgement in before the deadline the coordinator sets the
 * sequences, then, in one transaction, moves the operation to `flip` (only if still
 * `pause` and before its deadline) and writes the new flags and the event into the state;
 * participants apply the flags, resume and acknowledge `flipped`. A participant that says
 * no, or is silent until the deadline, aborts the operation: phase `abort`, everyone
 * resumes on the side they were on. A participant that hears nothing by the deadline asks
 * the control table; one that cannot reach it keeps the database paused (it cannot know
 * which side is authoritative) and says so in status.
 *
 * An instance that starts (or reconnects) while an operation is pausing holds the database
 * as well, without being waited for, until the operation ends: it must not write on the
 * old side while the others flip.
 *
 * Fail closed: a member without its control connection changes no flags (changes fail at
 * the store), is listed in status (`state.connected` false) and metrics, and a switchover
 * is refused while any instance is stale (registered, but no heartbeat within
 * PD_FLEET_LIVE_MS), since it may still be serving on the old side.
 */
#ifndef PD_ADMIN_FLEET_H
#define PD_ADMIN_FLEET_H

#include <jansson.h>
#include <stdbool.h>

#include "admin/socket.h"
#include "admin/watch.h"
#include "proxy/server.h"

#define PD_FLEET_LIVE_MS      5000 /* a heartbeat older than this: the instance is stale */
#define PD_FLEET_HEARTBEAT_MS 1000

typedef struct pd_fleet pd_fleet_t;

/* Starts this instance's member (srv->state is shared). NULL with a logged error. */
pd_fleet_t *pd_fleet_start(pd_server_t *srv, const char *conninfo);
/* Ends the thread and removes this instance's row (best effort). */
void pd_fleet_stop(pd_fleet_t *f);

/* For status: {backend, instance, version, schema_version, connected, error, lost_ms,
 * instances, held}. */
json_t *pd_fleet_status(pd_fleet_t *f);
/* Is this instance coordinating a fleet operation (one at a time)? */
bool pd_fleet_coordinating(const pd_fleet_t *f);
/* For metrics: connected (0/1), state version, live instances. */
void pd_fleet_numbers(pd_fleet_t *f, int *connected, long long *version, int *live);

/* The guardrail of a switchover in a fleet: connected, and no stale instance. Appends
 * {check: "fleet", ok, value, hint} to checks; true when it passed. */
bool pd_fleet_check(pd_fleet_t *f, json_t *checks);

/* `fleet` and `fleet forget ID`. */
void pd_cmd_fleet(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv);

/*
 * Runs a switchover (rollback false) or rollback of database across the fleet, answering
 * req. checks (taken) are the guardrails as checked; each participant also checks what only
 * it can answer (pd_cutover_local_ok) before it acknowledges, unless force. watch: a switchover's
 * --watch (NULL or window 0: none); it watches this instance's traffic and divergence. auto_for:
 * the watch whose automatic rollback this is (req NULL; pd_watch_rollback_done tells it the end).
 */
void pd_fleet_switchover(pd_server_t *srv, pd_admin_req_t *req, bool rollback, const char *database,
                         uint64_t timeout_ms, json_t *checks, const char *who, bool force,
                         const pd_watch_opts_t *watch, pd_watch_t *auto_for);

#endif /* PD_ADMIN_FLEET_H */
