/*
 * sql_internal.h — what the parts of the SQL rewriter share, and nothing outside rules/sql*.c
 * may include: the compiled rules (sql.c), the statement context with its refusal, the
 * protobuf-c tree helpers (sql_tree.c), the write rewriting (sql_write.c), the read
 * rewriting (sql_read.c), the literal templates (sql_tmpl.c) and the result cache
 * (sql_cache.c).
 *
 * Trees are libpg_query's protobuf-c messages, unpacked with the default (malloc) allocator:
 * every message, repeated-field array and string of a tree is a separate malloc block, so
 * nodes built here with malloc can be linked into an unpacked tree and are released by
 * protobuf_c_message_free_unpacked together with it.
 */
#ifndef PD_RULES_SQL_INTERNAL_H
#define PD_RULES_SQL_INTERNAL_H

#include <pg_query.h>
#include <pg_query/pg_query.pb-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rules/sql.h"

/* Deeper trees than this are not walked: the statement is treated as too complex. The
   cheap estimate in sql.c keeps libpg_query itself well below the depth where its own
   recursion would exhaust the stack. */
#define PD__MAX_DEPTH 3000

typedef PgQuery__Node pd__node_t;

/* ---------------------------------------------------------------------------------------
 * Compiled rules (sql.c).
 */
typedef struct {
    char *schema; /* NULL when the rule names the table without a schema */
    char *rel;
} pd__tname_t;

typedef struct {
    const char *old; /* borrowed from the config */
    const char *new;
    pd__node_t *up;   /* template over old columns; NULL when the text does not parse */
    pd__node_t *down; /* template over new columns; NULL when the text does not parse */
} pd__pair_t;

typedef struct {
    bool loaded;
    unsigned ncolumns;
    char **columns;
    pd__node_t **defaults; /* per column: the parsed default, NULL when it has none */
    bool *default_bad;     /* per column: a default the parser could not read */
} pd__facts_t;

typedef struct {
    int index; /* in cfg->rules */
    const pd_rule_cfg_t *cfg;
    bool columns_kind;
    bool all_tables; /* a tables rule without a list: every table */
    pd__tname_t *tables;
    unsigned ntables;
    pd__pair_t *pairs;
    unsigned npairs;
    pd__facts_t facts;
    const pd_table_facts_t **tfacts; /* tables rules: per table, NULL when unknown; borrowed */
    /* A translator: the columns of one table of a `tables` rule that new renames or
       transforms, compiled as a columns rule (columns_kind) of that table. While new is
       authoritative (writes dual-new|new) it rewrites the application's statements, still
       written for old's schema, for new's: reads of an old column read `down` of the new
       one, and assignments of an old column assign the new one `up` of the value instead.
       `index` is the tables rule's; `label` names the table in messages. */
    bool xlate;
    char *label;
} pd__rule_t;

/* ---------------------------------------------------------------------------------------
 * One pass over one statement: the views in force and what the pass found.
 */
typedef struct {
    const pd__rule_t *rules; /* every rule of the config */
    unsigned nrules;
    const pd__rule_t *xrules; /* the translators of tables rules that map columns */
    unsigned nxrules;
    const bool *in_db;           /* rules[i] belongs to the statement's database */
    const pd_rule_view_t *views; /* effective: reads shadow already resolved to old or new */
    const pd_rule_view_t *given; /* as the caller gave them (reads shadow unresolved) */
    const pd__node_t *null_const;

    bool changed;  /* the tree was edited: the statement must be deparsed */
    bool is_write; /* writes a rule table */
    int rule;      /* lowest index of a rule whose table the statement names, or -1 */
    bool oom;
    int depth;

    bool refused;
    const char *sqlstate;
    char *message;
    char *hint;
    int refuse_rule;

    /* The mirror pass (tables rules in dual): */
    pd_mirror_kind_t mirror;
    int mirror_rule;
    bool read_new; /* see pd_sql_result_t */
    pd_txn_kind_t txn;
    bool txn_commit;
    bool set_local;
    pd_image_kind_t image;
    char *image_sql; /* malloc'd */
    unsigned image_cols;
    uint32_t *image_types; /* malloc'd */
    int client_cols;
    const size_t *image_returning; /* the length of the RETURNING list the image extends
                                      (in the tree; the read pass may expand a `*` in it) */
    char *image_table;             /* malloc'd */
    unsigned image_nkey;
    unsigned *image_key; /* malloc'd */
} pd__ctx_t;

/* Records the first refusal of the pass (later ones are dropped): the rule, SQLSTATE, hint
   and a printf-style message. */
void pd__refuse(pd__ctx_t *ctx, int rule, const char *sqlstate, const char *hint, const char *fmt,
                ...) __attribute__((format(printf, 5, 6)));
/* A refusal (0A000) of a statement concerning rule r, its message a printf-style `what`
   followed by the rule and its writes flag: "while rule R has writes=W", or for the mirror
   of a tables rule ", so rule R (writes=W) could not keep the new database in step". */
void pd__refuse_rule(pd__ctx_t *ctx, const pd__rule_t *r, const char *hint, bool mirror,
                     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Marks the pass out of memory; returns false so that callers can `return pd__oom(ctx)`. */
bool pd__oom(pd__ctx_t *ctx);
/* The pass should stop: refused or out of memory. */
bool pd__stopped(const pd__ctx_t *ctx);

/* Does the relation name one of the rule's tables? */
bool pd__rule_matches(const pd__rule_t *r, const PgQuery__RangeVar *rv);
/* Which of the rule's tables it names (index in r->tables), or -1. */
int pd__rule_table_index(const pd__rule_t *r, const PgQuery__RangeVar *rv);
/* The rules the column passes look at: the config's (0 .. nrules-1), then the
   translators; pd__col_rules(ctx) counts them. */
const pd__rule_t *pd__col_rule(const pd__ctx_t *ctx, unsigned i);
unsigned pd__col_rules(const pd__ctx_t *ctx);
/* Rule in force for writes / for reads=new in this pass? A translator is in force, for
   both, while its tables rule has new authoritative. */
bool pd__rule_writes_dual(const pd__ctx_t *ctx, const pd__rule_t *r);
bool pd__rule_reads_new(const pd__ctx_t *ctx, const pd__rule_t *r);
/* The rule's table as configured, for messages. */
const char *pd__rule_table(const pd__rule_t *r);
/* The parsed default of a column: NULL with *known = false when the facts are unknown
   (or the default did not parse), the shared NULL constant when it has none. */
const pd__node_t *pd__rule_default(const pd__ctx_t *ctx, const pd__rule_t *r, const char *col,
                                   bool *known);
/* Does the column have a default other than NULL (facts loaded)? */
bool pd__rule_has_default(const pd__rule_t *r, const char *col);

/* ---------------------------------------------------------------------------------------
 * Tree helpers (sql_tree.c). Constructors return NULL when out of memory and then free
 * whatever they were given to own, so that calls can be nested.
 */
pd__node_t *pd__node_wrap(PgQuery__Node__NodeCase kind, void *msg);
pd__node_t *pd__node_copy(const pd__node_t *n);
void pd__node_free(pd__node_t *n);
/* dst takes src's content in place (dst's old content is freed, src's shell too). */
void pd__node_become(pd__node_t *dst, pd__node_t *src);
pd__node_t *pd__make_string(const char *s);
pd__node_t *pd__make_column_ref(const char *qual, const char *name);
/* A reference like `ref`'s qualifier (every field but the last) followed by name. */
pd__node_t *pd__make_column_ref_like(const PgQuery__ColumnRef *ref, const char *name);
pd__node_t *pd__make_star_ref(const char *qual);
pd__node_t *pd__make_res_target(const char *name, pd__node_t *val);
pd__node_t *pd__make_list(void);
/* Appends item to a repeated Node field; frees item and returns false when out of memory
   (or when item is NULL, which is how a failed constructor arrives). */
bool pd__append(pd__node_t ***arr, size_t *n, pd__node_t *item);
/* Inserts at position at (shifting the rest); same ownership rules as pd__append. */
bool pd__insert(pd__node_t ***arr, size_t *n, size_t at, pd__node_t *item);

/* The text of a String node, or NULL. */
const char *pd__str(const pd__node_t *n);
/* The column name of a single-field ColumnRef, or NULL. */
const char *pd__plain_ref(const pd__node_t *n);
/* Does a ColumnRef end in `*`? */
bool pd__is_star(const PgQuery__ColumnRef *ref);
/* The name a FROM item is referred to by (alias or relation name). */
const char *pd__refname(const PgQuery__RangeVar *rv);

/* Visits n and every node below it in pre-order; fn returns false to skip a node's
   children. Returns false when the tree is deeper than PD__MAX_DEPTH. */
typedef bool (*pd__visit_fn)(pd__node_t *n, void *arg);
bool pd__walk(ProtobufCMessage *m, pd__visit_fn fn, void *arg);
/* Calls fn on every message-valued field (each element of repeated ones) of m. */
typedef void (*pd__child_fn)(ProtobufCMessage *child, void *arg);
void pd__each_child(ProtobufCMessage *m, pd__child_fn fn, void *arg);

/* Does the expression call a function known to be volatile (random(), nextval(), ...)?
   Sets *fname to its name. */
bool pd__calls_volatile(const pd__node_t *n, const char **fname);
/* Does the tree contain an INSERT, UPDATE, DELETE or MERGE? */
bool pd__has_dml(const pd__node_t *n);

/* The parse tree of sql, unpacked (pg_query__parse_result__free_unpacked(tree, NULL)); NULL
   when it does not parse or out of memory. */
PgQuery__ParseResult *pd__parse_tree(const char *sql);
/* Parses `SELECT <expr>` and returns the expression, or NULL (bad text or out of memory). */
pd__node_t *pd__parse_expr(const char *text);
/* Deparses one statement; malloc'd text, or NULL. */
char *pd__deparse(PgQuery__RawStmt *raw, int32_t version);
/* PostgreSQL's FigureColname for the raw expressions the rewriter changes: the name a
   target-list entry without AS gets; NULL for "?column?". Points into the tree. */
const char *pd__figure_colname(const pd__node_t *n);

/* ---------------------------------------------------------------------------------------
 * Substitution (sql_write.c): a copy of an up/down template whose column references are
 * replaced with the values a statement assigns.
 */
typedef struct {
    const pd__rule_t *rule;
    const char **names;  /* the columns assigned ... */
    pd__node_t **values; /* ... and their values; NULL: assigned by a sub-SELECT */
    size_t n;
    bool insert;      /* unassigned columns take their default (else: the current row) */
    const char *qual; /* UPDATE: qualifier for references to the current row, or NULL */
} pd__assign_t;

/* ---------------------------------------------------------------------------------------
 * The passes.
 */
/* Sets ctx->is_write and ctx->rule. */
void pd__classify(pd__ctx_t *ctx, pd__node_t *stmt);
/* writes=dual/dual-new: adds the partner columns to every write, or refuses. */
void pd__rewrite_writes(pd__ctx_t *ctx, pd__node_t *stmt);
/* reads=new: serves old columns from the new ones, or refuses. */
void pd__rewrite_reads(pd__ctx_t *ctx, pd__node_t *stmt);
/* tables rules in dual: what the mirror does with the statement (sql_mirror.c); adds the
   RETURNING columns of a row image to the statement, or refuses. */
void pd__plan_mirror(pd__ctx_t *ctx, pd__node_t *stmt);
/* After the read pass: the client's share of a row image's RETURNING, recounted. */
void pd__settle_mirror(pd__ctx_t *ctx);
/* Is a tables rule of the statement's database mirroring writes in this pass? */
bool pd__rule_mirrors(const pd__ctx_t *ctx, const pd__rule_t *r);

/* ---------------------------------------------------------------------------------------
 * Growing text (sql.c): appends that stop at the first failed allocation and say so in oom.
 */
typedef struct {
    char *buf; /* NUL-terminated once anything was added; owned by the user */
    size_t len, cap;
    bool oom;
} pd__text_t;

void pd__text_add(pd__text_t *t, const char *s, size_t n);

/* ---------------------------------------------------------------------------------------
 * Tokens and literal templates (sql_tmpl.c). A statement's template is its text with each
 * literal token (as PostgreSQL's lexer sees it) replaced by $1..$n; a rewrite computed once
 * for the template serves every statement of that shape, with the literals' original bytes
 * put back where the rewrite has $i.
 */
/* A statement's tokens as PostgreSQL's lexer gives them (pg_query_scan), read one at a time
   straight from libpg_query's packed result: unpacking it into protobuf-c structs (a malloc
   per token) cost half as much again as the lexing itself. */
typedef struct {
    size_t start, end; /* the token's bytes: start <= end <= the text's length */
    PgQuery__Token token;
} pd__token_t;

typedef struct {
    PgQueryScanResult raw; /* owns the packed tokens */
    size_t len;            /* of the text scanned */
    const uint8_t *at, *end;
    uint32_t f_tokens, f_start, f_end, f_token; /* field numbers, from the descriptors */
    bool bad; /* the packed result did not read as its schema says: treat the text as
                 unscannable */
} pd__scan_t;

/* Scans sql. Returns false, with nothing to close, when the lexer rejects the text. */
bool pd__scan_open(pd__scan_t *s, const char *sql);
/* The next token; false at the end, or on a malformed result (which sets s->bad). */
bool pd__scan_next(pd__scan_t *s, pd__token_t *tok);
/* Back to the first token. */
void pd__scan_rewind(pd__scan_t *s);
void pd__scan_close(pd__scan_t *s);
/* SCONST, USCONST, BCONST, XCONST, ICONST or FCONST. */
bool pd__is_literal_token(PgQuery__Token t);

typedef struct {
    size_t n;            /* literals, in order: literal i becomes $(i+1) */
    size_t *start, *end; /* each literal's bytes in the statement */
    size_t *at;          /* where each $i starts in the template */
    char *kinds;         /* one letter per literal for its token kind, NUL-terminated */
    size_t ntokens;      /* the statement's tokens, comments included */
    pd__text_t tmpl;     /* the template text */
} pd__lits_t;

typedef enum {
    PD__LITS_OK,   /* out is filled in: free it with pd__lits_free */
    PD__LITS_NONE, /* no template: no literal, a $n already, a token the lexer rejects, or a
                      Unicode string (whose token position libpg_query does not report) */
    PD__LITS_OOM,
} pd__lits_status_t;

pd__lits_status_t pd__lits_take(const char *sql, pd__lits_t *out);
void pd__lits_free(pd__lits_t *l);
/* The same for plain text without the lexer (sql_tmpl.c says what is plain): PD__LITS_NONE
   when the text is not plain (ask pd__lits_take), else exactly pd__lits_take's answer,
   ntokens excepted (0): for looking a template up, never for making one. */
pd__lits_status_t pd__lits_take_plain(const char *sql, pd__lits_t *out);
/* Does the template lex as the statement did, each $i a parameter token exactly where its
   literal stood? (Replacing a literal can glue it to its neighbour: N'x' becomes the
   identifier N$1.) False too when out of memory: the template is then simply not used. */
bool pd__lits_verify(const pd__lits_t *l);

/* A rewritten template cut at its $i tokens, ready to be filled with a statement's
   literals. */
typedef struct {
    char *text; /* the rewritten template without its $i tokens */
    size_t len;
    size_t nslots;
    size_t *cut; /* slot j goes at text + cut[j] ... */
    size_t *lit; /* ... and takes the bytes of literal lit[j] */
} pd__split_t;

typedef enum {
    PD__SPLIT_OK,
    PD__SPLIT_UNSAFE, /* a $n outside 1..nlits, a literal missing, or text that does not lex */
    PD__SPLIT_OOM,
} pd__split_status_t;

/* Cuts `out`, a rewrite of a template with nlits literals, at its parameter tokens (found
   by the lexer, so that a "$1" inside a string, identifier or comment stays text). Every
   $1..$nlits must occur: a rewrite that dropped a literal is not trusted as a template. */
pd__split_status_t pd__split_make(const char *out, size_t nlits, pd__split_t *s);
/* The text with the statement's literals in their slots; malloc'd, NULL when out of memory. */
char *pd__split_fill(const pd__split_t *s, const char *sql, const pd__lits_t *l);
void pd__split_free(pd__split_t *s);

/* ---------------------------------------------------------------------------------------
 * The LRU cache of results (sql_cache.c).
 */
typedef struct pd__entry pd__entry_t;
typedef struct {
    size_t cap, count;
    pd__entry_t **buckets;
    size_t nbuckets;
    pd__entry_t *head, *tail; /* most and least recently used */
    uint64_t evictions;
} pd__cache_t;

/* Releases a value the cache drops. */
typedef void (*pd__release_fn)(void *value);

bool pd__cache_init(pd__cache_t *c, size_t cap);
void pd__cache_destroy(pd__cache_t *c);
uint64_t pd__cache_hash(const char *key, size_t len);
/* The value cached under key (now the most recently used), or NULL. It stays the cache's:
   valid until the next put or clear, so a user that keeps it takes a reference of its own. */
void *pd__cache_get(pd__cache_t *c, const char *key, size_t len, uint64_t hash);
/* Caches value under key; the cache takes over both and calls release on the value when it
   drops it. Returns false when out of memory, after freeing key and releasing value. */
bool pd__cache_put(pd__cache_t *c, char *key, size_t len, uint64_t hash, void *value,
                   pd__release_fn release);
void pd__cache_clear(pd__cache_t *c);

#endif /* PD_RULES_SQL_INTERNAL_H */
