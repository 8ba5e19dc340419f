/*
 * socket.h — the admin socket: a Unix socket (mode 0600) on the proxy's event loop; one
 * command per line in, one JSON object per line out ({"ok": true, ...} or
 * {"ok": false, "error": "...", "hint": "..."}). A bad command fails only itself: the
 * connection stays open for the next one.
 */
#ifndef PD_ADMIN_SOCKET_H
#define PD_ADMIN_SOCKET_H

#include <stdbool.h>

#include "proxy/server.h"

typedef struct pd_admin pd_admin_t;

/* Listens on path (removing a stale socket file first). NULL after logging a failure. */
pd_admin_t *pd_admin_start(pd_server_t *srv, const char *path);

/* Closes the listener and every admin connection; memory goes in close callbacks. */
void pd_admin_stop(pd_admin_t *admin);

/* A pending asynchronous command; answered exactly once with pd_admin_reply, which takes
 * the reply's reference and frees req (the reply is dropped if the client went away). */
typedef struct pd_admin_req pd_admin_req_t;
struct json_t;
void pd_admin_reply(pd_admin_req_t *req, struct json_t *reply);

/* Has the admin client of a pending command gone away (its reply would be dropped)? */
bool pd_admin_req_gone(const pd_admin_req_t *req);

/* Who runs the command being dispatched ("uid 0 pid 4711"), for the state's history. */
const char *pd_admin_who(void);

/* Runs one command line and returns its reply (caller frees with json_decref). Exposed
 * for the unit tests of the command table. */
struct json_t *pd_admin_execute(pd_server_t *srv, const char *line);

/* A rule as `rules` lists it: name, database, kind, flags, tables or columns, catalog
 * error, last verify without its keys (those hold values). A new reference. */
struct json_t *pd_admin_rule_json(const pd_server_t *srv, unsigned index);

#endif /* PD_ADMIN_SOCKET_H */
