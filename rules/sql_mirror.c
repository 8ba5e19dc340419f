/*
 * sql_mirror.c — the mirror pass: what the other database of a `tables` rule in dual
 * must do with a statement (DESIGN.md §4 "Mirroring writes to a second database").
 *
 *  - Transaction control and session settings are kept in step (PD_MIRROR_TXN, _SET).
 *  - A write to a rule table whose effect is the same wherever it runs is replayed
 *    verbatim (PD_MIRROR_WRITE).
 *  - A write whose effect depends on where it runs — a function that is not known to give
 *    the same result on every server (now(), random(), nextval(), user functions), a
 *    read of a table the rule does not move, an omitted column whose default is such a
 *    function or an identity — is replayed as row images (PD_MIRROR_IMAGE): the statement
 *    gets RETURNING of the columns the mirror needs appended after the client's own, the
 *    session strips them before the client sees the rows, and the mirror applies each
 *    row with `image_sql`.
 *  - What cannot be replayed faithfully is refused, naming the rule and what to do.
 *
 * Deciding "the same everywhere" errs on the side of row images: they are always right,
 * only dearer.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/sql_internal.h"

/* Functions that give the same result for the same arguments on any server with the same
   settings (the session's settings are kept in step). Anything else makes a write a row
   image. */
static const char *const same_everywhere[] = {
    "abs",
    "btrim",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "concat",
    "concat_ws",
    "floor",
    "initcap",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "md5",
    "octet_length",
    "position",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "rpad",
    "rtrim",
    "split_part",
    "strpos",
    "substr",
    "substring",
    "to_char",
    "to_number",
    "translate",
    "trim",
    "trunc",
    "upper",
    "mod",
    "power",
    "sqrt",
    "sign",
    "jsonb_build_object",
    "json_build_object",
    "jsonb_set",
    "array_append",
    "array_remove",
    "coalesce",
    "greatest",
    "least",
    "nullif",
    "int4",
    "int8",
    "text",
    "numeric",
    "float8",
};

static bool same_everywhere_fn(const char *name)
{
    for (size_t i = 0; i < sizeof same_everywhere / sizeof *same_everywhere; i++)
        if (strcmp(name, same_everywhere[i]) == 0)
            return true;
    return false;
}

bool pd__rule_mirrors(const pd__ctx_t *ctx, const pd__rule_t *r)
{
    if (r->columns_kind || !ctx->in_db[r->index])
        return false;
    pd_writes_t w = ctx->views[r->index].writes;
    return w == PD_WRITES_DUAL || w == PD_WRITES_DUAL_NEW;
}

static bool new_authoritative(const pd__ctx_t *ctx, const pd__rule_t *r)
{
    return ctx->views[r->index].writes == PD_WRITES_DUAL_NEW;
}

/* reads=aa: the session's second connection goes to the authoritative side itself. */
static bool rule_aa(const pd__ctx_t *ctx, const pd__rule_t *r)
{
    return !r->columns_kind && ctx->in_db[r->index] && ctx->given[r->index].reads == PD_READS_AA;
}

/* The first rule in this pass that keeps a second connection in step (mirroring writes,
   or comparing A/A), or NULL. */
static const pd__rule_t *stepping_rule(const pd__ctx_t *ctx)
{
    for (unsigned i = 0; i < ctx->nrules; i++)
        if (pd__rule_mirrors(ctx, &ctx->rules[i]) || rule_aa(ctx, &ctx->rules[i]))
            return &ctx->rules[i];
    return NULL;
}

/* The facts of the rule table a relation names, or NULL (not a table of the rule). Sets
 *member when the relation is one of the rule's tables even if its facts are unknown. */
static const pd_table_facts_t *table_of(const pd__rule_t *r, const PgQuery__RangeVar *rv,
                                        bool *member)
{
    int i = pd__rule_table_index(r, rv);
    *member = i >= 0;
    return i >= 0 && r->tfacts != NULL ? r->tfacts[i] : NULL;
}

/* ---------------------------------------------------------------------------------------
 * Same everywhere?
 */
typedef struct {
    const pd__rule_t *rule;
    const char *why; /* the first thing found that depends on where it runs */
} det_t;

static bool find_local(pd__node_t *n, void *arg)
{
    det_t *d = arg;
    if (d->why != NULL)
        return false;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_FUNC_CALL: {
        const PgQuery__FuncCall *f = n->func_call;
        const char *name = f->n_funcname > 0 ? pd__str(f->funcname[f->n_funcname - 1]) : NULL;
        if (name == NULL || !same_everywhere_fn(name))
            d->why = "a function call";
        break;
    }
    case PG_QUERY__NODE__NODE_SQLVALUE_FUNCTION:
        d->why = "a CURRENT_... value";
        break;
    case PG_QUERY__NODE__NODE_SET_TO_DEFAULT:
        d->why = "DEFAULT";
        break;
    case PG_QUERY__NODE__NODE_RANGE_VAR: {
        bool member = false;
        (void)table_of(d->rule, n->range_var, &member);
        if (!member)
            d->why = "a table the rule does not move";
        break;
    }
    case PG_QUERY__NODE__NODE_RANGE_FUNCTION:
    case PG_QUERY__NODE__NODE_RANGE_TABLE_SAMPLE:
        d->why = "a function in FROM";
        break;
    default:
        break;
    }
    return d->why == NULL;
}

/* NULL when n is the same everywhere, else what is not (for messages). */
static const char *local_part(const pd__rule_t *r, const ProtobufCMessage *n)
{
    if (n == NULL)
        return NULL;
    det_t d = {.rule = r};
    /* The walk does not modify the tree; the cast only fits the visitor's signature. */
    if (!pd__walk((ProtobufCMessage *)n, find_local, &d))
        return "a statement nested too deeply";
    return d.why;
}

/* Is the default of column i the same everywhere (a constant, or none)? */
static bool default_same_everywhere(const pd__rule_t *r, const pd_table_facts_t *t, unsigned i)
{
    if (t->generated != NULL && (t->generated[i] == 'a' || t->generated[i] == 'd'))
        return false; /* identity */
    if (t->defaults == NULL || t->defaults[i] == NULL)
        return true;
    pd__node_t *e = pd__parse_expr(t->defaults[i]);
    bool same = e != NULL && local_part(r, &e->base) == NULL;
    pd__node_free(e);
    return same;
}

static bool named_in(const PgQuery__InsertStmt *ins, const char *col)
{
    for (size_t i = 0; i < ins->n_cols; i++) {
        const pd__node_t *c = ins->cols[i];
        if (c->node_case == PG_QUERY__NODE__NODE_RES_TARGET && c->res_target->name != NULL &&
            strcmp(c->res_target->name, col) == 0)
            return true;
    }
    return false;
}

/* The number of values each row of INSERT ... VALUES gives, or -1 (a SELECT). */
static long values_width(const PgQuery__InsertStmt *ins)
{
    const pd__node_t *sel = ins->select_stmt;
    if (sel == NULL || sel->node_case != PG_QUERY__NODE__NODE_SELECT_STMT ||
        sel->select_stmt->n_values_lists == 0)
        return -1;
    const pd__node_t *first = sel->select_stmt->values_lists[0];
    return first->node_case == PG_QUERY__NODE__NODE_LIST ? (long)first->list->n_items : -1;
}

/* Does an INSERT leave a column to a default that is not the same everywhere? */
static const char *local_default(const pd__rule_t *r, const PgQuery__InsertStmt *ins,
                                 const pd_table_facts_t *t)
{
    long width = ins->n_cols > 0 ? -1 : ins->select_stmt == NULL ? 0 : values_width(ins);
    for (unsigned i = 0; i < t->ncolumns; i++) {
        bool given = ins->n_cols > 0 ? named_in(ins, t->columns[i])
                                     : width < 0 || (long)i < width; /* SELECT: all given */
        if (!given && !default_same_everywhere(r, t, i))
            return "a column default";
    }
    /* INSERT ... SELECT without a column list may still leave trailing columns out. */
    if (ins->n_cols == 0 && width < 0)
        for (unsigned i = 0; i < t->ncolumns; i++)
            if (!default_same_everywhere(r, t, i))
                return "a column default";
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Row images
 */
static void sb_str(pd__text_t *b, const char *s)
{
    pd__text_add(b, s, strlen(s));
}

__attribute__((format(printf, 2, 3))) static void sb_fmt(pd__text_t *b, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp)
        b->oom = true;
    else
        pd__text_add(b, tmp, (size_t)n);
}

/* An identifier, always quoted (so that any name is taken as it is). */
static void sb_ident(pd__text_t *b, const char *id)
{
    pd__text_add(b, "\"", 1);
    for (const char *p = id; *p; p++)
        pd__text_add(b, *p == '"' ? "\"\"" : p, *p == '"' ? 2 : 1);
    pd__text_add(b, "\"", 1);
}

static void sb_table(pd__text_t *b, const pd_table_facts_t *t)
{
    sb_ident(b, t->schema);
    pd__text_add(b, ".", 1);
    sb_ident(b, t->name);
}

static bool is_key(const pd_table_facts_t *t, unsigned col)
{
    for (unsigned k = 0; k < t->nkey; k++)
        if (t->key[k] == col)
            return true;
    return false;
}

/* Columns a row image carries: every stored column (generated ones are computed on the
   mirror), or the key only for a delete. */
static bool carried(const pd_table_facts_t *t, unsigned col, pd_image_kind_t kind)
{
    if (kind == PD_IMAGE_DELETE)
        return is_key(t, col);
    return t->generated == NULL || t->generated[col] != 's';
}

static const char *new_name(const pd__rule_t *r, const char *col);

/* The carried columns' names on new, comma-separated. */
static void sb_columns(pd__text_t *b, const pd__rule_t *r, const pd_table_facts_t *t,
                       const unsigned *param)
{
    for (unsigned i = 0, k = 0; i < t->ncolumns; i++)
        if (param[i]) {
            sb_str(b, k++ ? ", " : "");
            sb_ident(b, new_name(r, t->columns[i]));
        }
}

/* ON CONFLICT (key) DO UPDATE SET every other carried column (or DO NOTHING). */
static void sb_on_conflict(pd__text_t *b, const pd__rule_t *r, const pd_table_facts_t *t,
                           const unsigned *param)
{
    sb_str(b, " ON CONFLICT (");
    for (unsigned k = 0; k < t->nkey; k++) {
        sb_str(b, k ? ", " : "");
        sb_ident(b, new_name(r, t->columns[t->key[k]]));
    }
    unsigned set = 0;
    for (unsigned i = 0; i < t->ncolumns; i++)
        if (param[i] && !is_key(t, i)) {
            sb_str(b, set++ ? ", " : ") DO UPDATE SET ");
            sb_ident(b, new_name(r, t->columns[i]));
            sb_str(b, " = EXCLUDED.");
            sb_ident(b, new_name(r, t->columns[i]));
        }
    if (set == 0)
        sb_str(b, ") DO NOTHING");
}

/* WHERE key = $n AND ... */
static void sb_where_key(pd__text_t *b, const pd__rule_t *r, const pd_table_facts_t *t,
                         const unsigned *param)
{
    for (unsigned k = 0; k < t->nkey; k++) {
        sb_str(b, k ? " AND " : " WHERE ");
        sb_ident(b, new_name(r, t->columns[t->key[k]]));
        sb_fmt(b, " = $%u", param[t->key[k]]);
    }
}

/* The rule's mapping of an old column to new (renamed or transformed), or NULL. */
static const pd_column_map_t *mapping(const pd__rule_t *r, const char *col)
{
    for (unsigned i = 0; i < r->cfg->column_count; i++)
        if (strcmp(r->cfg->columns[i].old, col) == 0)
            return &r->cfg->columns[i];
    return NULL;
}

static bool table_mapped(const pd__rule_t *r, const pd_table_facts_t *t)
{
    for (unsigned i = 0; i < t->ncolumns; i++)
        if (mapping(r, t->columns[i]) != NULL)
            return true;
    return false;
}

/* The new side's name of a column. */
static const char *new_name(const pd__rule_t *r, const char *col)
{
    const pd_column_map_t *m = r != NULL ? mapping(r, col) : NULL;
    return m != NULL ? m->new : col;
}

/*
 * The image statement when the rule maps columns: the row's old values become a one-row
 * VALUES list named with the old column names, over which each new column is computed
 * (`up`, or a plain copy), so that an `up` expression is evaluated by the new server on
 * exactly the values the old side wrote.
 */
static char *mapped_image_statement(const pd__rule_t *r, const pd_table_facts_t *t,
                                    pd_image_kind_t kind)
{
    pd__text_t b = {0};
    unsigned n = 0;
    unsigned param[t->ncolumns + 1];
    for (unsigned i = 0; i < t->ncolumns; i++)
        param[i] = carried(t, i, kind) ? ++n : 0;
    /* SELECT <new values> FROM (VALUES ($1, ...)) AS pgdual_image (<old names>) */
    pd__text_t sel = {0};
    sb_str(&sel, "SELECT ");
    for (unsigned i = 0, k = 0; i < t->ncolumns; i++) {
        if (!param[i])
            continue;
        const pd_column_map_t *m = mapping(r, t->columns[i]);
        sb_str(&sel, k++ ? ", " : "");
        if (m != NULL && m->up != NULL) {
            sb_str(&sel, "(");
            sb_str(&sel, m->up);
            sb_str(&sel, ")");
        } else {
            sb_ident(&sel, t->columns[i]);
        }
    }
    sb_str(&sel, " FROM (VALUES (");
    for (unsigned i = 0, k = 0; i < t->ncolumns; i++)
        if (param[i])
            sb_fmt(&sel, "%s$%u", k++ ? ", " : "", param[i]);
    sb_str(&sel, ")) AS pgdual_image (");
    for (unsigned i = 0, k = 0; i < t->ncolumns; i++)
        if (param[i]) {
            sb_str(&sel, k++ ? ", " : "");
            sb_ident(&sel, t->columns[i]);
        }
    sb_str(&sel, ")");
    if (kind == PD_IMAGE_INSERT || kind == PD_IMAGE_UPSERT) {
        sb_str(&b, "INSERT INTO ");
        sb_table(&b, t);
        sb_str(&b, " (");
        sb_columns(&b, r, t, param);
        sb_str(&b, ") OVERRIDING SYSTEM VALUE ");
        sb_str(&b, sel.buf != NULL ? sel.buf : "");
        if (kind == PD_IMAGE_UPSERT)
            sb_on_conflict(&b, r, t, param);
    } else if (kind == PD_IMAGE_UPDATE) {
        sb_str(&b, "UPDATE ");
        sb_table(&b, t);
        sb_str(&b, " SET (");
        sb_columns(&b, r, t, param);
        sb_str(&b, ") = (");
        sb_str(&b, sel.buf != NULL ? sel.buf : "");
        sb_str(&b, ")");
        sb_where_key(&b, r, t, param);
    } else {
        sb_str(&b, "DELETE FROM ");
        sb_table(&b, t);
        sb_where_key(&b, r, t, param);
    }
    free(sel.buf);
    if (b.oom || sel.oom) {
        free(b.buf);
        return NULL;
    }
    return b.buf;
}

/* The statement that applies one row image: its parameters are the carried columns in
   column order. */
static char *image_statement(const pd_table_facts_t *t, pd_image_kind_t kind)
{
    pd__text_t b = {0};
    unsigned n = 0;
    unsigned param[t->ncolumns + 1];
    for (unsigned i = 0; i < t->ncolumns; i++)
        param[i] = carried(t, i, kind) ? ++n : 0;
    if (kind == PD_IMAGE_INSERT || kind == PD_IMAGE_UPSERT) {
        sb_str(&b, "INSERT INTO ");
        sb_table(&b, t);
        sb_str(&b, " (");
        sb_columns(&b, NULL, t, param);
        sb_str(&b, ") OVERRIDING SYSTEM VALUE VALUES (");
        for (unsigned i = 0, k = 0; i < t->ncolumns; i++)
            if (param[i])
                sb_fmt(&b, "%s$%u", k++ ? ", " : "", param[i]);
        sb_str(&b, ")");
        if (kind == PD_IMAGE_UPSERT)
            sb_on_conflict(&b, NULL, t, param);
    } else {
        sb_str(&b, kind == PD_IMAGE_UPDATE ? "UPDATE " : "DELETE FROM ");
        sb_table(&b, t);
        unsigned set = 0;
        for (unsigned i = 0; kind == PD_IMAGE_UPDATE && i < t->ncolumns; i++)
            if (param[i] && !is_key(t, i)) {
                sb_str(&b, set++ ? ", " : " SET ");
                sb_ident(&b, t->columns[i]);
                sb_fmt(&b, " = $%u", param[i]);
            }
        if (kind == PD_IMAGE_UPDATE && set == 0) {
            free(b.buf);
            return strdup(""); /* a table of key columns only: nothing to update */
        }
        sb_where_key(&b, NULL, t, param);
    }
    if (b.oom) {
        free(b.buf);
        return NULL;
    }
    return b.buf;
}

#define refuse_mirror(ctx, r, hint, ...) pd__refuse_rule(ctx, r, hint, true, __VA_ARGS__)

static const char *const keep_hint =
    "Rewrite the statement, or set writes=old for the rule while it runs and then run "
    "`pgdualctl verify RULE --repair`.";

/* Appends RETURNING of the carried columns (qualified by the target's name) to a write. */
static void plan_image(pd__ctx_t *ctx, const pd__rule_t *r, const pd_table_facts_t *t,
                       const PgQuery__RangeVar *rv, pd__node_t ***returning, size_t *nreturning,
                       pd_image_kind_t kind)
{
    if (kind != PD_IMAGE_INSERT && t->nkey == 0) {
        refuse_mirror(ctx, r, keep_hint,
                      "%s of %s.%s depends on where it runs and the table has no key to replay "
                      "it by",
                      kind == PD_IMAGE_DELETE ? "a DELETE" : "a write", t->schema, t->name);
        return;
    }
    ctx->client_cols = *nreturning > 0 ? (int)*nreturning : -1;
    ctx->image_returning = nreturning;
    ctx->image_types = calloc(t->ncolumns + 1, sizeof *ctx->image_types);
    ctx->image_key = calloc(t->nkey + 1, sizeof *ctx->image_key);
    /* With new authoritative the statement was translated for new, and the RETURNING
       added below reads old's columns through `down` (sql_read.c): old takes the image as
       it is. */
    ctx->image_sql = table_mapped(r, t) && !new_authoritative(ctx, r)
                         ? mapped_image_statement(r, t, kind)
                         : image_statement(t, kind);
    if (ctx->image_types == NULL || ctx->image_key == NULL || ctx->image_sql == NULL ||
        asprintf(&ctx->image_table, "%s.%s", t->schema, t->name) < 0) {
        ctx->image_table = NULL;
        pd__oom(ctx);
        return;
    }
    const char *qual = pd__refname(rv);
    for (unsigned i = 0; i < t->ncolumns; i++) {
        if (!carried(t, i, kind))
            continue;
        if (!pd__append(returning, nreturning,
                        pd__make_res_target(NULL, pd__make_column_ref(qual, t->columns[i])))) {
            pd__oom(ctx);
            return;
        }
        for (unsigned k = 0; k < t->nkey; k++)
            if (t->key[k] == i)
                ctx->image_key[k] = ctx->image_cols;
        ctx->image_types[ctx->image_cols++] = t->types != NULL ? t->types[i] : 0;
    }
    ctx->image_nkey = t->nkey;
    ctx->mirror = PD_MIRROR_IMAGE;
    ctx->image = kind;
    ctx->changed = true;
}

/* An UPDATE that assigns a key column cannot be replayed by its key. The SET list may
   already be translated for new (new authoritative): its name there counts too. */
static const char *assigned_key(const pd__rule_t *r, const PgQuery__UpdateStmt *u,
                                const pd_table_facts_t *t)
{
    for (size_t i = 0; i < u->n_target_list; i++) {
        const pd__node_t *n = u->target_list[i];
        if (n->node_case != PG_QUERY__NODE__NODE_RES_TARGET || n->res_target->name == NULL)
            continue;
        for (unsigned k = 0; k < t->nkey; k++) {
            const char *col = t->columns[t->key[k]];
            if (strcmp(n->res_target->name, col) == 0 ||
                strcmp(n->res_target->name, new_name(r, col)) == 0)
                return col;
        }
    }
    return NULL;
}

/* The target of a top-level write to a rule table, planned; false when the statement is not
   one (the caller looks further). */
static bool plan_write(pd__ctx_t *ctx, const pd__rule_t *r, pd__node_t *stmt)
{
    PgQuery__RangeVar *rv = NULL;
    pd__node_t ***ret = NULL;
    size_t *nret = NULL;
    pd_image_kind_t kind = 0;
    const char *local = NULL;
    switch (stmt->node_case) {
    case PG_QUERY__NODE__NODE_INSERT_STMT: {
        PgQuery__InsertStmt *s = stmt->insert_stmt;
        rv = s->relation;
        ret = &s->returning_list;
        nret = &s->n_returning_list;
        kind = s->on_conflict_clause != NULL ? PD_IMAGE_UPSERT : PD_IMAGE_INSERT;
        break;
    }
    case PG_QUERY__NODE__NODE_UPDATE_STMT:
        rv = stmt->update_stmt->relation;
        ret = &stmt->update_stmt->returning_list;
        nret = &stmt->update_stmt->n_returning_list;
        kind = PD_IMAGE_UPDATE;
        break;
    case PG_QUERY__NODE__NODE_DELETE_STMT:
        rv = stmt->delete_stmt->relation;
        ret = &stmt->delete_stmt->returning_list;
        nret = &stmt->delete_stmt->n_returning_list;
        kind = PD_IMAGE_DELETE;
        break;
    default:
        return false;
    }
    bool member = false;
    const pd_table_facts_t *t = table_of(r, rv, &member);
    if (!member)
        return false;
    ctx->is_write = true;
    ctx->mirror_rule = r->index;
    if (t == NULL || !t->loaded) {
        refuse_mirror(ctx, r, "Check that pgdual could read the catalog (pgdualctl rules).",
                      "the catalog facts of %s are unknown", rv->relname);
        return true;
    }
    local = local_part(r, &stmt->base);
    if (local == NULL && kind != PD_IMAGE_UPDATE && kind != PD_IMAGE_DELETE)
        local = local_default(r, stmt->insert_stmt, t);
    /* A table with a key is replayed by row images even when the statement is the same
       everywhere: under commit: async each session's mirror trails on its own, and only
       exact rows, applied in the order the authoritative side wrote each key (mirror.c),
       come out the same whatever the mirror's data is at that moment. A write that sets
       the key itself can only be replayed verbatim. */
    bool sets_key = kind == PD_IMAGE_UPDATE && assigned_key(r, stmt->update_stmt, t) != NULL;
    bool mapped = table_mapped(r, t);
    for (unsigned k = 0; mapped && k < t->nkey; k++) {
        const pd_column_map_t *m = mapping(r, t->columns[t->key[k]]);
        if (m != NULL && m->up != NULL) {
            refuse_mirror(ctx, r, "Map key columns by name only (no up expression).",
                          "key column \"%s\" of %s.%s is transformed on the new side",
                          t->columns[t->key[k]], t->schema, t->name);
            return true;
        }
    }
    if (mapped && (sets_key || (t->nkey == 0 && kind != PD_IMAGE_INSERT))) {
        refuse_mirror(ctx, r, keep_hint,
                      "%s.%s has columns renamed or transformed on the new side, and this "
                      "write can only be replayed as written",
                      t->schema, t->name);
        return true;
    }
    if (local == NULL && !mapped && (t->nkey == 0 || sets_key)) {
        ctx->mirror = PD_MIRROR_WRITE;
        return true;
    }
    if (sets_key) {
        refuse_mirror(ctx, r, keep_hint,
                      "an UPDATE of key column \"%s\" of %s.%s with %s can only be replayed by "
                      "its key",
                      assigned_key(r, stmt->update_stmt, t), t->schema, t->name, local);
        return true;
    }
    plan_image(ctx, r, t, rv, ret, nret, kind);
    return true;
}

/* Any write to a rule table below the top (WITH clauses): replayed verbatim or refused. */
typedef struct {
    const pd__rule_t *rule;
    bool found;
    const pd_table_facts_t *mapped; /* a written table whose columns new maps */
} dml_t;

static bool find_rule_dml(pd__node_t *n, void *arg)
{
    dml_t *d = arg;
    const PgQuery__RangeVar *rv = NULL;
    if (n->node_case == PG_QUERY__NODE__NODE_INSERT_STMT)
        rv = n->insert_stmt->relation;
    else if (n->node_case == PG_QUERY__NODE__NODE_UPDATE_STMT)
        rv = n->update_stmt->relation;
    else if (n->node_case == PG_QUERY__NODE__NODE_DELETE_STMT)
        rv = n->delete_stmt->relation;
    else if (n->node_case == PG_QUERY__NODE__NODE_MERGE_STMT)
        rv = n->merge_stmt->relation;
    bool member = false;
    const pd_table_facts_t *t = rv != NULL ? table_of(d->rule, rv, &member) : NULL;
    if (member && t != NULL && table_mapped(d->rule, t))
        d->mapped = t;
    d->found = d->found || member;
    return d->mapped == NULL;
}

static bool copy_names(const PgQuery__CopyStmt *c, const char *col)
{
    for (size_t i = 0; i < c->n_attlist; i++)
        if (pd__str(c->attlist[i]) != NULL && strcmp(pd__str(c->attlist[i]), col) == 0)
            return true;
    return false;
}

/*
 * COPY ... FROM STDIN into a rule table: the client's data is replayed verbatim on new,
 * which gives the same rows when every column left out takes a default that is the same
 * everywhere (not a sequence, identity, now()...), the table's columns are not mapped,
 * and a WHERE clause calls nothing that differs. Files and programs on the server are
 * not the client's to replay.
 */
static void plan_copy(pd__ctx_t *ctx, const pd__rule_t *r, const PgQuery__CopyStmt *c)
{
    bool member = false;
    const pd_table_facts_t *t = table_of(r, c->relation, &member);
    const char *why = NULL;
    if (c->filename != NULL && c->filename[0] != '\0')
        why = c->is_program ? "a program run by the server" : "a file on the server";
    else if (t == NULL || !t->loaded)
        why = "a table whose catalog facts are unknown";
    else if (table_mapped(r, t) && !new_authoritative(ctx, r))
        why = "a table whose columns are renamed or transformed on the new side";
    else if (local_part(r, c->where_clause != NULL ? &c->where_clause->base : NULL) != NULL)
        why = "a WHERE clause that depends on where it runs";
    for (unsigned i = 0; why == NULL && t != NULL && i < t->ncolumns; i++)
        if (c->n_attlist > 0 && !copy_names(c, t->columns[i]) && !default_same_everywhere(r, t, i))
            why = "a column left to a default that differs between servers (a sequence, "
                  "identity, now(), ...); list it in the COPY with its values";
    if (why != NULL) {
        refuse_mirror(ctx, r, keep_hint, "COPY FROM into %s reads %s", c->relation->relname, why);
        return;
    }
    ctx->mirror = PD_MIRROR_COPY;
}

static void plan_other(pd__ctx_t *ctx, const pd__rule_t *r, pd__node_t *stmt)
{
    if (stmt->node_case == PG_QUERY__NODE__NODE_TRUNCATE_STMT) {
        const PgQuery__TruncateStmt *t = stmt->truncate_stmt;
        size_t members = 0;
        for (size_t i = 0; i < t->n_relations; i++) {
            bool member = false;
            if (t->relations[i]->node_case == PG_QUERY__NODE__NODE_RANGE_VAR)
                (void)table_of(r, t->relations[i]->range_var, &member);
            members += member;
        }
        if (members == 0)
            return;
        ctx->is_write = true;
        ctx->mirror_rule = r->index;
        if (members < t->n_relations)
            refuse_mirror(ctx, r, "Truncate the rule's tables and the others in two statements.",
                          "TRUNCATE names tables of the rule together with others");
        else
            ctx->mirror = PD_MIRROR_WRITE;
        return;
    }
    if (stmt->node_case == PG_QUERY__NODE__NODE_COPY_STMT) {
        const PgQuery__CopyStmt *c = stmt->copy_stmt;
        bool member = false;
        if (c->is_from && c->relation != NULL)
            (void)table_of(r, c->relation, &member);
        if (member) {
            ctx->is_write = true;
            ctx->mirror_rule = r->index;
            plan_copy(ctx, r, c);
        }
        return;
    }
    dml_t d = {.rule = r};
    if (!pd__walk(&stmt->base, find_rule_dml, &d)) {
        refuse_mirror(ctx, r, keep_hint, "the statement is nested too deeply to examine");
        return;
    }
    if (!d.found)
        return;
    ctx->is_write = true;
    ctx->mirror_rule = r->index;
    if (stmt->node_case == PG_QUERY__NODE__NODE_PREPARE_STMT && pd__rule_mirrors(ctx, r)) {
        /* Its EXECUTE names no table: the mirror would get the PREPARE and never the
           write. */
        refuse_mirror(ctx, r,
                      "Use the protocol's prepared statements (Parse/Bind, most drivers' "
                      "default), which pgdual keeps in step, or send the statement itself.",
                      "PREPARE of a write to a table of the rule cannot be mirrored (its "
                      "EXECUTE would write one side only)");
        return;
    }
    if (d.mapped != NULL && !new_authoritative(ctx, r)) {
        /* New's columns differ: the client's text would not write the same there. */
        refuse_mirror(ctx, r, keep_hint,
                      "%s writes %s.%s, whose columns are renamed or transformed on the new side, "
                      "and only a plain INSERT, UPDATE or DELETE can be replayed there as row "
                      "images",
                      stmt->node_case == PG_QUERY__NODE__NODE_MERGE_STMT ? "MERGE" : "a statement",
                      d.mapped->schema, d.mapped->name);
        return;
    }
    const char *local = local_part(r, &stmt->base);
    if (local == NULL)
        ctx->mirror = PD_MIRROR_WRITE;
    else
        refuse_mirror(ctx, r, keep_hint,
                      "%s writes a table of the rule with %s, which cannot be replayed verbatim "
                      "(only a plain INSERT, UPDATE or DELETE can be replayed as row images)",
                      stmt->node_case == PG_QUERY__NODE__NODE_MERGE_STMT ? "MERGE" : "a statement",
                      local);
}

static void plan_txn(pd__ctx_t *ctx, const pd__rule_t *r, const PgQuery__TransactionStmt *t)
{
    ctx->mirror = PD_MIRROR_TXN;
    ctx->mirror_rule = r->index;
    switch (t->kind) {
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_BEGIN:
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_START:
        ctx->txn = PD_TXN_BEGIN;
        break;
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_COMMIT:
        ctx->txn_commit = true;
        ctx->txn = PD_TXN_END;
        break;
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_ROLLBACK:
        ctx->txn = PD_TXN_END;
        break;
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_SAVEPOINT:
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_RELEASE:
    case PG_QUERY__TRANSACTION_STMT_KIND__TRANS_STMT_ROLLBACK_TO:
        ctx->txn = PD_TXN_INNER;
        break;
    default:
        ctx->mirror = PD_MIRROR_NONE;
        if (!pd__rule_mirrors(ctx, r))
            break; /* A/A: nothing is written on the second connection */
        refuse_mirror(ctx, r,
                      "Commit or roll back without two-phase commit while the rule mirrors "
                      "writes.",
                      "two-phase commit (PREPARE TRANSACTION) is not kept in step across two "
                      "databases");
        break;
    }
}

/* Does a read touch only the rule's tables and nothing that differs between servers? */
typedef struct {
    const pd__rule_t *rule;
    bool ok, any;
} read_t;

static bool find_foreign(pd__node_t *n, void *arg)
{
    read_t *d = arg;
    if (n->node_case == PG_QUERY__NODE__NODE_RANGE_VAR) {
        bool member = false;
        (void)table_of(d->rule, n->range_var, &member);
        d->ok = d->ok && member;
        d->any = d->any || member;
    } else if (n->node_case == PG_QUERY__NODE__NODE_SQLVALUE_FUNCTION ||
               n->node_case == PG_QUERY__NODE__NODE_RANGE_FUNCTION) {
        d->ok = false;
    } else if (n->node_case == PG_QUERY__NODE__NODE_FUNC_CALL) {
        /* Values that differ between two servers by nature. */
        static const char *const per_server[] = {"now",
                                                 "statement_timestamp",
                                                 "transaction_timestamp",
                                                 "timeofday",
                                                 "pg_backend_pid",
                                                 "inet_server_addr",
                                                 "inet_server_port",
                                                 "version",
                                                 "pg_current_xact_id",
                                                 "txid_current",
                                                 "pg_postmaster_start_time",
                                                 "current_setting",
                                                 "pg_current_wal_lsn"};
        const PgQuery__FuncCall *f = n->func_call;
        const char *name = f->n_funcname > 0 ? pd__str(f->funcname[f->n_funcname - 1]) : NULL;
        for (size_t i = 0; name != NULL && i < sizeof per_server / sizeof *per_server; i++)
            if (strcmp(name, per_server[i]) == 0)
                d->ok = false;
    }
    return d->ok;
}

/* reads=shadow of a tables rule: a SELECT of the rule's tables only, without volatile
   functions or CURRENT_* values, is run on new too and compared; reads=aa runs it a second
   time on old (A/A). */
static void plan_shadow(pd__ctx_t *ctx, pd__node_t *stmt)
{
    if (stmt->node_case != PG_QUERY__NODE__NODE_SELECT_STMT ||
        stmt->select_stmt->into_clause != NULL || pd__has_dml(stmt) ||
        stmt->select_stmt->n_locking_clause > 0)
        return;
    const char *fname = NULL;
    if (pd__calls_volatile(stmt, &fname))
        return;
    for (unsigned i = 0; i < ctx->nrules; i++) {
        const pd__rule_t *r = &ctx->rules[i];
        bool read_new =
            ctx->given[i].reads == PD_READS_NEW && ctx->given[i].writes == PD_WRITES_DUAL;
        if (r->columns_kind || !ctx->in_db[i] ||
            (ctx->given[i].reads != PD_READS_SHADOW && ctx->given[i].reads != PD_READS_AA &&
             !read_new))
            continue;
        read_t d = {.rule = r, .ok = true};
        if (!pd__walk(&stmt->base, find_foreign, &d) || !d.ok || !d.any)
            continue;
        for (unsigned t = 0; ctx->given[i].reads != PD_READS_AA && t < r->ntables; t++)
            if (r->tfacts != NULL && r->tfacts[t] != NULL && table_mapped(r, r->tfacts[t]))
                return; /* new's columns differ: the same text would not read the same */
        if (read_new) {
            /* Served by new outside transactions (the session's side changes); anything
               else stays on old, the authoritative side. */
            ctx->read_new = true;
            ctx->mirror_rule = r->index;
            return;
        }
        ctx->mirror = PD_MIRROR_SHADOW;
        ctx->mirror_rule = r->index;
        return;
    }
}

/* The client's own RETURNING columns once every pass has run: a translator's read pass
   may have expanded a `*` among them (the image's columns, appended last, stay one each). */
void pd__settle_mirror(pd__ctx_t *ctx)
{
    if (ctx->mirror != PD_MIRROR_IMAGE || ctx->client_cols < 0 || ctx->image_returning == NULL)
        return;
    size_t n = *ctx->image_returning;
    if (n >= ctx->image_cols)
        ctx->client_cols = (int)(n - ctx->image_cols);
}

void pd__plan_mirror(pd__ctx_t *ctx, pd__node_t *stmt)
{
    if (stmt != NULL && stmt->node_case == PG_QUERY__NODE__NODE_SELECT_STMT && !pd__has_dml(stmt)) {
        plan_shadow(ctx, stmt);
        return;
    }
    const pd__rule_t *r = stepping_rule(ctx);
    if (r == NULL || stmt == NULL)
        return;
    switch (stmt->node_case) {
    case PG_QUERY__NODE__NODE_TRANSACTION_STMT:
        plan_txn(ctx, r, stmt->transaction_stmt);
        return;
    case PG_QUERY__NODE__NODE_VARIABLE_SET_STMT:
        ctx->mirror = PD_MIRROR_SET;
        ctx->mirror_rule = r->index;
        ctx->set_local =
            stmt->variable_set_stmt->is_local ||
            stmt->variable_set_stmt->kind == PG_QUERY__VARIABLE_SET_KIND__VAR_SET_MULTI;
        return;
    case PG_QUERY__NODE__NODE_DISCARD_STMT:
    case PG_QUERY__NODE__NODE_LISTEN_STMT:   /* the mirror forwards what it is notified of */
    case PG_QUERY__NODE__NODE_UNLISTEN_STMT: /* (pd_mirror, read_results) */
        ctx->mirror = PD_MIRROR_SET;
        ctx->mirror_rule = r->index;
        return;
    default:
        break;
    }
    if (!pd__rule_mirrors(ctx, r))
        return; /* A/A: writes run on the authoritative side only */
    if (!plan_write(ctx, r, stmt))
        plan_other(ctx, r, stmt);
}
