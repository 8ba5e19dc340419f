/*
 * sql_read.c — the reads=new rewriting: every reference to an old column of a rule table
 * is served from the new columns through the rule's down template, wherever the statement
 * reads (target lists, WHERE, JOIN, GROUP BY, ORDER BY, subqueries, CTEs, RETURNING, the
 * read parts of writes, COPY ... TO), and result columns keep the names the client
 * expects. References are resolved the way PostgreSQL resolves them, level by level
 * through FROM items, aliases and CTE names; where the resolution cannot be known without
 * the catalog (an unqualified name inside a subquery over other tables), the reference
 * is left alone, which still reads correct data while writes keep both columns in step.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/sql_internal.h"

/* A FROM item of one query level. */
typedef struct {
    const char *name;      /* what it is referred to by; NULL when it cannot be */
    PgQuery__RangeVar *rv; /* a table (not a CTE reference), else NULL */
    bool hidden;           /* inside a JOIN with an alias: not reachable by its own name */
} item_t;

/* One query level: its FROM items and the CTE names it declares. */
typedef struct scope {
    const struct scope *parent;
    item_t *items;
    size_t nitems, cap;
    bool borrowed; /* items belong to another scope */
    const char **ctes;
    size_t nctes;
    bool merged; /* a JOIN ... USING or NATURAL JOIN merges columns at this level */
} scope_t;

static void rd_stmt(pd__ctx_t *ctx, const scope_t *parent, pd__node_t *n);
static void rd_select(pd__ctx_t *ctx, const scope_t *parent, PgQuery__SelectStmt *s);
static void rd_expr(pd__ctx_t *ctx, const scope_t *scope, pd__node_t *n);

static void scope_free(scope_t *s)
{
    if (!s->borrowed)
        free(s->items);
    free(s->ctes);
}

static bool add_item(pd__ctx_t *ctx, scope_t *s, const char *name, PgQuery__RangeVar *rv,
                     bool hidden)
{
    if (s->nitems == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 4;
        item_t *grown = realloc(s->items, cap * sizeof *grown);
        if (grown == NULL)
            return pd__oom(ctx);
        s->items = grown;
        s->cap = cap;
    }
    s->items[s->nitems++] = (item_t){name != NULL && name[0] != '\0' ? name : NULL, rv, hidden};
    return true;
}

static bool add_cte(pd__ctx_t *ctx, scope_t *s, const char *name)
{
    const char **grown = realloc(s->ctes, (s->nctes + 1) * sizeof *grown);
    if (grown == NULL)
        return pd__oom(ctx);
    grown[s->nctes++] = name;
    s->ctes = grown;
    return true;
}

static bool is_cte(const scope_t *s, const PgQuery__RangeVar *rv)
{
    if (rv->schemaname != NULL && rv->schemaname[0] != '\0')
        return false;
    for (; s != NULL; s = s->parent)
        for (size_t i = 0; i < s->nctes; i++)
            if (strcmp(s->ctes[i], rv->relname) == 0)
                return true;
    return false;
}

/* ---------------------------------------------------------------------------------------
 * Rules in force for a relation.
 */
static const pd__rule_t *reads_rule(const pd__ctx_t *ctx, const PgQuery__RangeVar *rv)
{
    for (unsigned i = 0; rv != NULL && i < pd__col_rules(ctx); i++) {
        const pd__rule_t *r = pd__col_rule(ctx, i);
        if (pd__rule_reads_new(ctx, r) && pd__rule_matches(r, rv))
            return r;
    }
    return NULL;
}

/* The pair whose old column `col` is, among the reads=new rules of the relation. */
static const pd__pair_t *old_pair(const pd__ctx_t *ctx, const PgQuery__RangeVar *rv,
                                  const char *col, const pd__rule_t **rule)
{
    for (unsigned i = 0; rv != NULL && i < pd__col_rules(ctx); i++) {
        const pd__rule_t *r = pd__col_rule(ctx, i);
        if (!pd__rule_reads_new(ctx, r) || !pd__rule_matches(r, rv))
            continue;
        for (unsigned k = 0; k < r->npairs; k++)
            if (strcmp(r->pairs[k].old, col) == 0) {
                *rule = r;
                return &r->pairs[k];
            }
    }
    return NULL;
}

static void refuse_read(pd__ctx_t *ctx, const pd__rule_t *r, const char *hint, const char *what)
{
    pd__refuse(ctx, r->index, "0A000", hint, "pgdual: %s while rule \"%s\" has reads=new", what,
               r->cfg->name);
}

static const char *catalog_hint =
    "List the columns, or check that pgdual could read the catalog (pgdualctl rules).";

/* ---------------------------------------------------------------------------------------
 * Resolving a column reference.
 */
typedef struct {
    const pd__rule_t *rule;
    const pd__pair_t *pair;
    const item_t *item;
    const scope_t *level;
} match_t;

static bool match_item(const pd__ctx_t *ctx, const scope_t *s, const item_t *it, const char *col,
                       match_t *m)
{
    const pd__pair_t *p = old_pair(ctx, it->rv, col, &m->rule);
    if (p == NULL)
        return false;
    m->pair = p;
    m->item = it;
    m->level = s;
    return true;
}

/* An unqualified name belongs to the innermost level whose FROM items have it. A level
   with other FROM items may have it without the catalog saying so: resolution stops
   there and the reference stays as written. */
static bool resolve_unqualified(const pd__ctx_t *ctx, const scope_t *s, const char *col, match_t *m)
{
    for (; s != NULL; s = s->parent) {
        for (size_t i = 0; i < s->nitems; i++)
            if (match_item(ctx, s, &s->items[i], col, m))
                return true;
        if (s->nitems > 0)
            return false;
    }
    return false;
}

static bool names_item(const item_t *it, const char *schema, const char *q)
{
    if (it->hidden || it->name == NULL || strcmp(it->name, q) != 0)
        return false;
    if (schema == NULL)
        return true;
    /* schema.table.column: the item must be that table, without an alias. */
    if (it->rv == NULL || (it->rv->alias != NULL && it->rv->alias->aliasname[0] != '\0'))
        return false;
    const char *rs = it->rv->schemaname;
    return rs == NULL || rs[0] == '\0' || strcmp(rs, schema) == 0;
}

static bool resolve_qualified(const pd__ctx_t *ctx, const scope_t *s, const char *schema,
                              const char *q, const char *col, match_t *m)
{
    for (; s != NULL; s = s->parent)
        for (size_t i = 0; i < s->nitems; i++)
            if (names_item(&s->items[i], schema, q)) {
                if (schema != NULL) {
                    /* The schema must be the rule table's. */
                    PgQuery__RangeVar probe = *s->items[i].rv;
                    probe.schemaname = (char *)schema;
                    if (!match_item(ctx, s, &s->items[i], col, m))
                        return false;
                    return pd__rule_matches(m->rule, &probe);
                }
                return match_item(ctx, s, &s->items[i], col, m);
            }
    return false;
}

static bool resolve(const pd__ctx_t *ctx, const scope_t *scope, const PgQuery__ColumnRef *ref,
                    match_t *m)
{
    size_t nf = ref->n_fields;
    const char *col = nf > 0 ? pd__str(ref->fields[nf - 1]) : NULL;
    if (col == NULL)
        return false;
    if (nf == 1)
        return resolve_unqualified(ctx, scope, col, m);
    const char *q = pd__str(ref->fields[nf - 2]);
    if (q == NULL)
        return false;
    if (nf == 2)
        return resolve_qualified(ctx, scope, NULL, q, col, m);
    const char *schema = pd__str(ref->fields[nf - 3]);
    return nf == 3 && schema != NULL && resolve_qualified(ctx, scope, schema, q, col, m);
}

/* ---------------------------------------------------------------------------------------
 * Serving a reference from the new columns.
 */
typedef struct {
    pd__ctx_t *ctx;
    const PgQuery__ColumnRef *like; /* qualify as this reference was, when it was */
    const char *qual;               /* else with this, when not NULL */
} qualify_t;

static bool qualify_visit(pd__node_t *n, void *arg)
{
    qualify_t *q = arg;
    const char *col = pd__plain_ref(n);
    if (col == NULL || pd__stopped(q->ctx))
        return col == NULL;
    pd__node_t *ref = q->like != NULL && q->like->n_fields > 1
                          ? pd__make_column_ref_like(q->like, col)
                          : pd__make_column_ref(q->qual, col);
    if (ref == NULL)
        return pd__oom(q->ctx);
    pd__node_become(n, ref);
    return false;
}

/* down(...) over the row the reference reads; NULL when refused or out of memory. */
static pd__node_t *served_from_new(pd__ctx_t *ctx, const pd__rule_t *r, const pd__pair_t *p,
                                   const PgQuery__ColumnRef *like, const char *qual)
{
    if (p->down == NULL) {
        char hint[160];
        snprintf(hint, sizeof hint,
                 "Fix the down expression of rule %s in the configuration and reload.",
                 r->cfg->name);
        pd__refuse(ctx, r->index, "F0000", hint,
                   "pgdual: the down expression of rule \"%s\" does not parse, so \"%s\" cannot "
                   "be read from the new columns",
                   r->cfg->name, p->old);
        return NULL;
    }
    pd__node_t *copy = pd__node_copy(p->down);
    if (copy == NULL) {
        pd__oom(ctx);
        return NULL;
    }
    qualify_t q = {ctx, like, qual};
    if (!pd__walk(&copy->base, qualify_visit, &q) || pd__stopped(ctx)) {
        pd__node_free(copy);
        if (!pd__stopped(ctx))
            pd__oom(ctx);
        return NULL;
    }
    return copy;
}

/* An unqualified reference is qualified when its level has several FROM items, in case
   another of them has a column named like the new one. */
static const char *level_qualifier(const match_t *m)
{
    return m->level->nitems > 1 ? m->item->name : NULL;
}

/* A bare name that is not one of the table's columns but the name of a translated table
   in scope (`row_to_json(u)`): a whole row of new, with new's column names, where the
   client expects old's: refused. */
static void whole_row_translated(pd__ctx_t *ctx, const scope_t *s, const PgQuery__ColumnRef *ref)
{
    const char *name = pd__str(ref->fields[0]);
    for (; name != NULL && s != NULL; s = s->parent)
        for (size_t i = 0; i < s->nitems; i++) {
            const item_t *it = &s->items[i];
            if (it->hidden || it->name == NULL || it->rv == NULL || strcmp(it->name, name) != 0)
                continue;
            const pd__rule_t *r = reads_rule(ctx, it->rv);
            if (r == NULL || !r->xlate)
                continue;
            for (unsigned c = 0; c < r->facts.ncolumns; c++)
                if (strcmp(r->facts.columns[c], name) == 0)
                    return; /* a column of that name wins */
            refuse_read(ctx, r, "Name the columns (or use \"alias.*\", which pgdual expands).",
                        "a whole-row reference to a table whose columns new renames or "
                        "transforms would show new's columns");
            return;
        }
}

static void rd_column_ref(pd__ctx_t *ctx, const scope_t *scope, pd__node_t *n)
{
    const PgQuery__ColumnRef *ref = n->column_ref;
    match_t m;
    if (pd__is_star(ref))
        return;
    if (!resolve(ctx, scope, ref, &m)) {
        if (ref->n_fields == 1 && ctx->nxrules > 0)
            whole_row_translated(ctx, scope, ref);
        return;
    }
    pd__node_t *rep = served_from_new(ctx, m.rule, m.pair, ref, level_qualifier(&m));
    if (rep == NULL)
        return;
    pd__node_become(n, rep);
    ctx->changed = true;
}

/* ---------------------------------------------------------------------------------------
 * Expressions: references are replaced, subqueries get a level of their own, everything
 * else is walked generically (except ON CONFLICT's inference clause, which names index
 * columns and expressions, not values).
 */
typedef struct {
    pd__ctx_t *ctx;
    const scope_t *scope;
} expr_walk_t;

static void rd_child(ProtobufCMessage *m, void *arg)
{
    expr_walk_t *w = arg;
    if (m->descriptor == &pg_query__node__descriptor)
        rd_expr(w->ctx, w->scope, (pd__node_t *)m);
    else if (m->descriptor != &pg_query__infer_clause__descriptor)
        pd__each_child(m, rd_child, w);
}

static void rd_expr(pd__ctx_t *ctx, const scope_t *scope, pd__node_t *n)
{
    if (n == NULL || pd__stopped(ctx))
        return;
    if (++ctx->depth > PD__MAX_DEPTH) {
        pd__refuse(ctx, ctx->rule, "54001", "Split the statement into simpler ones.",
                   "pgdual: the statement is nested too deeply to be examined");
        return;
    }
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_COLUMN_REF:
        rd_column_ref(ctx, scope, n);
        break;
    case PG_QUERY__NODE__NODE_SELECT_STMT:
    case PG_QUERY__NODE__NODE_INSERT_STMT:
    case PG_QUERY__NODE__NODE_UPDATE_STMT:
    case PG_QUERY__NODE__NODE_DELETE_STMT:
    case PG_QUERY__NODE__NODE_MERGE_STMT:
        rd_stmt(ctx, scope, n);
        break;
    default: {
        expr_walk_t w = {ctx, scope};
        pd__each_child(&n->base, rd_child, &w);
        break;
    }
    }
    ctx->depth--;
}

static void rd_exprs(pd__ctx_t *ctx, const scope_t *scope, pd__node_t **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        rd_expr(ctx, scope, list[i]);
}

/* ---------------------------------------------------------------------------------------
 * FROM items.
 */
static void rd_from_item(pd__ctx_t *ctx, scope_t *s, pd__node_t *n, bool hidden);

static void rd_range_var(pd__ctx_t *ctx, scope_t *s, PgQuery__RangeVar *rv, bool hidden)
{
    if (is_cte(s, rv)) {
        add_item(ctx, s, pd__refname(rv), NULL, hidden);
        return;
    }
    const pd__rule_t *r = reads_rule(ctx, rv);
    if (r != NULL && rv->alias != NULL && rv->alias->n_colnames > 0) {
        char what[256], hint[200];
        snprintf(what, sizeof what, "column aliases on \"%s\" (AS %s(...)) are not supported",
                 pd__rule_table(r), rv->alias->aliasname);
        snprintf(hint, sizeof hint, "Drop the column alias list, or set reads=old for rule %s.",
                 r->cfg->name);
        refuse_read(ctx, r, hint, what);
        return;
    }
    add_item(ctx, s, pd__refname(rv), rv, hidden);
}

/* A subquery in FROM sees the outer levels (and, when LATERAL, the items before it), but
   always this level's CTEs. */
static void rd_subselect(pd__ctx_t *ctx, scope_t *s, PgQuery__RangeSubselect *rs, bool hidden)
{
    scope_t outer = {.parent = s->parent, .ctes = s->ctes, .nctes = s->nctes, .borrowed = true};
    rd_stmt(ctx, rs->lateral ? s : &outer, rs->subquery);
    const char *name = rs->alias != NULL ? rs->alias->aliasname : NULL;
    add_item(ctx, s, name, NULL, hidden);
}

static const char *function_name(const PgQuery__RangeFunction *rf)
{
    if (rf->alias != NULL && rf->alias->aliasname[0] != '\0')
        return rf->alias->aliasname;
    /* functions: a list of (FuncCall, coldeflist) pairs; an unaliased single function is
       referred to by its name. */
    if (rf->n_functions != 1 || rf->functions[0]->node_case != PG_QUERY__NODE__NODE_LIST)
        return NULL;
    const PgQuery__List *pair = rf->functions[0]->list;
    if (pair->n_items == 0 || pair->items[0]->node_case != PG_QUERY__NODE__NODE_FUNC_CALL)
        return NULL;
    const PgQuery__FuncCall *fc = pair->items[0]->func_call;
    return fc->n_funcname > 0 ? pd__str(fc->funcname[fc->n_funcname - 1]) : NULL;
}

static void rd_join(pd__ctx_t *ctx, scope_t *s, PgQuery__JoinExpr *j, bool hidden)
{
    bool aliased = j->alias != NULL && j->alias->aliasname[0] != '\0';
    rd_from_item(ctx, s, j->larg, hidden || aliased);
    rd_from_item(ctx, s, j->rarg, hidden || aliased);
    if (j->is_natural || j->n_using_clause > 0)
        s->merged = true;
    rd_expr(ctx, s, j->quals);
    if (aliased)
        add_item(ctx, s, j->alias->aliasname, NULL, hidden);
}

static void rd_from_item(pd__ctx_t *ctx, scope_t *s, pd__node_t *n, bool hidden)
{
    if (n == NULL || pd__stopped(ctx))
        return;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_RANGE_VAR:
        rd_range_var(ctx, s, n->range_var, hidden);
        break;
    case PG_QUERY__NODE__NODE_RANGE_SUBSELECT:
        rd_subselect(ctx, s, n->range_subselect, hidden);
        break;
    case PG_QUERY__NODE__NODE_JOIN_EXPR:
        rd_join(ctx, s, n->join_expr, hidden);
        break;
    case PG_QUERY__NODE__NODE_RANGE_FUNCTION:
        /* Function arguments in FROM may refer to earlier items (implicitly LATERAL). */
        rd_exprs(ctx, s, n->range_function->functions, n->range_function->n_functions);
        add_item(ctx, s, function_name(n->range_function), NULL, hidden);
        break;
    case PG_QUERY__NODE__NODE_RANGE_TABLE_SAMPLE:
        rd_from_item(ctx, s, n->range_table_sample->relation, hidden);
        rd_exprs(ctx, s, n->range_table_sample->args, n->range_table_sample->n_args);
        rd_expr(ctx, s, n->range_table_sample->repeatable);
        break;
    default:
        rd_expr(ctx, s, n);
        add_item(ctx, s, NULL, NULL, hidden);
        break;
    }
}

static void rd_from(pd__ctx_t *ctx, scope_t *s, pd__node_t **list, size_t n)
{
    for (size_t i = 0; i < n && !pd__stopped(ctx); i++)
        rd_from_item(ctx, s, list[i], false);
}

static void rd_with(pd__ctx_t *ctx, scope_t *s, PgQuery__WithClause *w)
{
    if (w == NULL)
        return;
    /* A recursive WITH sees all its names in every body; otherwise each body sees the ones
       before it. */
    for (size_t i = 0; w->recursive && i < w->n_ctes; i++)
        if (w->ctes[i]->node_case == PG_QUERY__NODE__NODE_COMMON_TABLE_EXPR)
            add_cte(ctx, s, w->ctes[i]->common_table_expr->ctename);
    for (size_t i = 0; i < w->n_ctes && !pd__stopped(ctx); i++) {
        if (w->ctes[i]->node_case != PG_QUERY__NODE__NODE_COMMON_TABLE_EXPR)
            continue;
        PgQuery__CommonTableExpr *cte = w->ctes[i]->common_table_expr;
        rd_stmt(ctx, s, cte->ctequery);
        if (!w->recursive)
            add_cte(ctx, s, cte->ctename);
    }
}

/* ---------------------------------------------------------------------------------------
 * Target lists: names kept, `*` expanded.
 */
/* The entries standing for every column of a rule table read through `qual`. */
static bool table_columns(pd__ctx_t *ctx, const PgQuery__RangeVar *rv, const char *qual,
                          pd__node_t ***out, size_t *nout)
{
    const pd__rule_t *r = reads_rule(ctx, rv);
    if (!r->facts.loaded) {
        char what[256];
        snprintf(what, sizeof what,
                 "cannot expand * over \"%s\": the table's columns are not known",
                 pd__rule_table(r));
        refuse_read(ctx, r, catalog_hint, what);
        return false;
    }
    for (unsigned i = 0; i < r->facts.ncolumns; i++) {
        const char *col = r->facts.columns[i];
        const pd__rule_t *pr = NULL;
        const pd__pair_t *p = old_pair(ctx, rv, col, &pr);
        pd__node_t *val =
            p != NULL ? served_from_new(ctx, pr, p, NULL, qual) : pd__make_column_ref(qual, col);
        if (val == NULL && !pd__stopped(ctx))
            pd__oom(ctx);
        if (val == NULL || !pd__append(out, nout, pd__make_res_target(p ? col : NULL, val)))
            return pd__stopped(ctx) ? false : pd__oom(ctx);
    }
    return true;
}

static bool level_has_rule_item(const pd__ctx_t *ctx, const scope_t *s, bool *hidden_rule)
{
    bool any = false;
    for (size_t i = 0; i < s->nitems; i++) {
        if (reads_rule(ctx, s->items[i].rv) == NULL)
            continue;
        any = true;
        *hidden_rule = *hidden_rule || s->items[i].hidden;
    }
    return any;
}

/* `*`: every visible item in order, rule tables column by column. */
static bool expand_all(pd__ctx_t *ctx, const scope_t *s, pd__node_t ***out, size_t *nout)
{
    bool hidden_rule = false;
    level_has_rule_item(ctx, s, &hidden_rule);
    if (s->merged || hidden_rule) {
        const pd__rule_t *r = NULL;
        for (size_t i = 0; r == NULL && i < s->nitems; i++)
            r = reads_rule(ctx, s->items[i].rv);
        char what[256];
        snprintf(what, sizeof what,
                 "cannot expand * over \"%s\" joined with USING, NATURAL or under a join alias",
                 pd__rule_table(r));
        refuse_read(ctx, r, "List the columns.", what);
        return false;
    }
    size_t visible = 0;
    for (size_t i = 0; i < s->nitems; i++)
        visible += !s->items[i].hidden;
    for (size_t i = 0; i < s->nitems && !pd__stopped(ctx); i++) {
        const item_t *it = &s->items[i];
        if (it->hidden)
            continue;
        const char *qual = visible > 1 ? it->name : NULL;
        if (reads_rule(ctx, it->rv) != NULL) {
            if (!table_columns(ctx, it->rv, qual, out, nout))
                return false;
        } else if (it->name == NULL ||
                   !pd__append(out, nout, pd__make_res_target(NULL, pd__make_star_ref(it->name)))) {
            return pd__oom(ctx);
        }
    }
    return !pd__stopped(ctx);
}

static const item_t *find_named(const scope_t *s, const char *q)
{
    for (; s != NULL; s = s->parent)
        for (size_t i = 0; i < s->nitems; i++)
            if (names_item(&s->items[i], NULL, q))
                return &s->items[i];
    return NULL;
}

/* Replaces the `*` entry at *i with its columns when it covers a rule table; *i is left on
   the last entry that replaced it. */
static void expand_star(pd__ctx_t *ctx, const scope_t *s, pd__node_t ***list, size_t *n, size_t *i)
{
    const PgQuery__ColumnRef *ref = (*list)[*i]->res_target->val->column_ref;
    pd__node_t **cols = NULL;
    size_t ncols = 0;
    bool ok;
    if (ref->n_fields == 1) {
        bool hidden = false;
        if (!level_has_rule_item(ctx, s, &hidden))
            return;
        ok = expand_all(ctx, s, &cols, &ncols);
    } else {
        const char *q = ref->n_fields == 2 ? pd__str(ref->fields[0]) : NULL;
        const item_t *it = q != NULL ? find_named(s, q) : NULL;
        if (it == NULL || reads_rule(ctx, it->rv) == NULL)
            return;
        ok = table_columns(ctx, it->rv, q, &cols, &ncols);
    }
    /* No columns known (a table without any): the `*` stays as written. */
    pd__node_t **grown = ok && ncols > 0 ? realloc(*list, (*n + ncols) * sizeof *grown) : NULL;
    if (grown == NULL) {
        if (ok && ncols == 0) {
            free(cols);
            return;
        }
        if (ok)
            pd__oom(ctx);
        for (size_t k = 0; k < ncols; k++)
            pd__node_free(cols[k]);
        free(cols);
        return;
    }
    pd__node_free(grown[*i]);
    memmove(grown + *i + ncols, grown + *i + 1, (*n - *i - 1) * sizeof *grown);
    memcpy(grown + *i, cols, ncols * sizeof *grown);
    *list = grown;
    *n += ncols - 1;
    *i += ncols - 1;
    free(cols);
    ctx->changed = true;
}

/* A result column keeps the name PostgreSQL gave it before the rewrite. */
static void rd_named_target(pd__ctx_t *ctx, const scope_t *s, PgQuery__ResTarget *rt)
{
    if (rt->name != NULL && rt->name[0] != '\0') {
        rd_expr(ctx, s, rt->val);
        return;
    }
    const char *before = rt->val != NULL ? pd__figure_colname(rt->val) : NULL;
    char *kept = before != NULL ? strdup(before) : NULL;
    if (before != NULL && kept == NULL) {
        pd__oom(ctx);
        return;
    }
    rd_expr(ctx, s, rt->val);
    const char *after = rt->val != NULL ? pd__figure_colname(rt->val) : NULL;
    if (kept != NULL && !pd__stopped(ctx) && (after == NULL || strcmp(after, kept) != 0)) {
        rt->name = kept;
        return;
    }
    free(kept);
}

static void rd_target_list(pd__ctx_t *ctx, const scope_t *s, pd__node_t ***list, size_t *n)
{
    for (size_t i = 0; i < *n && !pd__stopped(ctx); i++) {
        pd__node_t *t = (*list)[i];
        if (t->node_case != PG_QUERY__NODE__NODE_RES_TARGET) {
            rd_expr(ctx, s, t);
            continue;
        }
        PgQuery__ResTarget *rt = t->res_target;
        if (rt->val != NULL && rt->val->node_case == PG_QUERY__NODE__NODE_COLUMN_REF &&
            pd__is_star(rt->val->column_ref))
            expand_star(ctx, s, list, n, &i);
        else
            rd_named_target(ctx, s, rt);
    }
}

/* ---------------------------------------------------------------------------------------
 * Statements.
 */
/* ORDER BY and DISTINCT ON take a bare name for a result column first (GROUP BY prefers
   input columns): such a reference is left for the result column, which keeps its name. */
static bool names_output(const PgQuery__SelectStmt *s, const pd__node_t *expr)
{
    const char *name = pd__plain_ref(expr);
    for (size_t i = 0; name != NULL && i < s->n_target_list; i++) {
        const pd__node_t *t = s->target_list[i];
        if (t->node_case != PG_QUERY__NODE__NODE_RES_TARGET)
            continue;
        const PgQuery__ResTarget *rt = t->res_target;
        const char *out = rt->name != NULL && rt->name[0] != '\0' ? rt->name
                          : rt->val != NULL                       ? pd__figure_colname(rt->val)
                                                                  : NULL;
        if (out != NULL && strcmp(out, name) == 0)
            return true;
    }
    return false;
}

static void rd_sort(pd__ctx_t *ctx, const scope_t *scope, const PgQuery__SelectStmt *s,
                    pd__node_t **list, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        pd__node_t *e = list[i];
        if (e->node_case == PG_QUERY__NODE__NODE_SORT_BY)
            e = e->sort_by->node;
        if (e != NULL && !names_output(s, e))
            rd_expr(ctx, scope, e);
    }
}

static bool is_setop(const PgQuery__SelectStmt *s)
{
    return s->op != PG_QUERY__SET_OPERATION__SETOP_NONE &&
           s->op != PG_QUERY__SET_OPERATION__SET_OPERATION_UNDEFINED;
}

static void rd_select(pd__ctx_t *ctx, const scope_t *parent, PgQuery__SelectStmt *s)
{
    if (s == NULL || pd__stopped(ctx))
        return;
    scope_t S = {.parent = parent};
    rd_with(ctx, &S, s->with_clause);
    if (is_setop(s)) {
        /* A set operation's ORDER BY can only name result columns. */
        rd_select(ctx, &S, s->larg);
        rd_select(ctx, &S, s->rarg);
        rd_expr(ctx, &S, s->limit_offset);
        rd_expr(ctx, &S, s->limit_count);
        scope_free(&S);
        return;
    }
    rd_from(ctx, &S, s->from_clause, s->n_from_clause);
    rd_target_list(ctx, &S, &s->target_list, &s->n_target_list);
    rd_expr(ctx, &S, s->where_clause);
    rd_exprs(ctx, &S, s->group_clause, s->n_group_clause);
    rd_expr(ctx, &S, s->having_clause);
    rd_exprs(ctx, &S, s->window_clause, s->n_window_clause);
    rd_exprs(ctx, &S, s->values_lists, s->n_values_lists);
    rd_sort(ctx, &S, s, s->distinct_clause, s->n_distinct_clause);
    rd_sort(ctx, &S, s, s->sort_clause, s->n_sort_clause);
    rd_expr(ctx, &S, s->limit_offset);
    rd_expr(ctx, &S, s->limit_count);
    scope_free(&S);
}

static void rd_set_values(pd__ctx_t *ctx, const scope_t *s, pd__node_t **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (list[i]->node_case == PG_QUERY__NODE__NODE_RES_TARGET)
            rd_expr(ctx, s, list[i]->res_target->val);
}

static void rd_insert(pd__ctx_t *ctx, const scope_t *parent, PgQuery__InsertStmt *ins)
{
    scope_t S = {.parent = parent};
    rd_with(ctx, &S, ins->with_clause);
    /* The VALUES or SELECT cannot see the target table. */
    rd_stmt(ctx, &S, ins->select_stmt);
    PgQuery__OnConflictClause *oc = ins->on_conflict_clause;
    if (oc != NULL) {
        scope_t O = {.parent = &S};
        add_item(ctx, &O, pd__refname(ins->relation), ins->relation, false);
        add_item(ctx, &O, "excluded", NULL, false);
        rd_set_values(ctx, &O, oc->target_list, oc->n_target_list);
        rd_expr(ctx, &O, oc->where_clause);
        scope_free(&O);
    }
    if (ins->n_returning_list > 0) {
        scope_t R = {.parent = &S};
        add_item(ctx, &R, pd__refname(ins->relation), ins->relation, false);
        rd_target_list(ctx, &R, &ins->returning_list, &ins->n_returning_list);
        scope_free(&R);
    }
    scope_free(&S);
}

static void rd_update(pd__ctx_t *ctx, const scope_t *parent, PgQuery__UpdateStmt *u)
{
    scope_t S = {.parent = parent};
    rd_with(ctx, &S, u->with_clause);
    add_item(ctx, &S, pd__refname(u->relation), u->relation, false);
    rd_from(ctx, &S, u->from_clause, u->n_from_clause);
    rd_set_values(ctx, &S, u->target_list, u->n_target_list);
    rd_expr(ctx, &S, u->where_clause);
    rd_target_list(ctx, &S, &u->returning_list, &u->n_returning_list);
    scope_free(&S);
}

static void rd_delete(pd__ctx_t *ctx, const scope_t *parent, PgQuery__DeleteStmt *d)
{
    scope_t S = {.parent = parent};
    rd_with(ctx, &S, d->with_clause);
    add_item(ctx, &S, pd__refname(d->relation), d->relation, false);
    rd_from(ctx, &S, d->using_clause, d->n_using_clause);
    rd_expr(ctx, &S, d->where_clause);
    rd_target_list(ctx, &S, &d->returning_list, &d->n_returning_list);
    scope_free(&S);
}

/* WHEN MATCHED sees target and source; WHEN NOT MATCHED only the source. */
static void rd_merge(pd__ctx_t *ctx, const scope_t *parent, PgQuery__MergeStmt *m)
{
    scope_t S = {.parent = parent};
    rd_with(ctx, &S, m->with_clause);
    add_item(ctx, &S, pd__refname(m->relation), m->relation, false);
    rd_from_item(ctx, &S, m->source_relation, false);
    rd_expr(ctx, &S, m->join_condition);
    scope_t src = {.parent = parent, .ctes = S.ctes, .nctes = S.nctes, .borrowed = true};
    if (S.nitems > 0) {
        src.items = S.items + 1;
        src.nitems = S.nitems - 1;
    }
    for (size_t i = 0; i < m->n_merge_when_clauses && !pd__stopped(ctx); i++) {
        pd__node_t *n = m->merge_when_clauses[i];
        if (n->node_case != PG_QUERY__NODE__NODE_MERGE_WHEN_CLAUSE)
            continue;
        PgQuery__MergeWhenClause *w = n->merge_when_clause;
        const scope_t *ws = w->matched ? &S : &src;
        rd_expr(ctx, ws, w->condition);
        rd_set_values(ctx, ws, w->target_list, w->n_target_list);
        rd_exprs(ctx, ws, w->values, w->n_values);
    }
    scope_free(&S);
}

/* COPY T TO: the columns it copies (its list, or every column). */
static const char **copy_columns(pd__ctx_t *ctx, const pd__rule_t *r, const PgQuery__CopyStmt *c,
                                 size_t *n)
{
    if (c->n_attlist == 0 && !r->facts.loaded) {
        char what[256];
        snprintf(what, sizeof what,
                 "COPY \"%s\" TO cannot be served from the new columns: the table's columns are "
                 "not known",
                 pd__rule_table(r));
        refuse_read(ctx, r, "Name the columns in the COPY, or use COPY (SELECT ...) TO.", what);
        return NULL;
    }
    *n = c->n_attlist > 0 ? c->n_attlist : r->facts.ncolumns;
    const char **cols = calloc(*n + 1, sizeof *cols);
    if (cols == NULL) {
        pd__oom(ctx);
        return NULL;
    }
    for (size_t i = 0; i < *n; i++)
        cols[i] = c->n_attlist > 0 ? pd__str(c->attlist[i]) : r->facts.columns[i];
    return cols;
}

static pd__node_t *copy_query(pd__ctx_t *ctx, PgQuery__CopyStmt *c, const char **cols, size_t n)
{
    PgQuery__SelectStmt *s = malloc(sizeof *s);
    if (s != NULL) {
        pg_query__select_stmt__init(s);
        s->op = PG_QUERY__SET_OPERATION__SETOP_NONE;
        s->limit_option = PG_QUERY__LIMIT_OPTION__LIMIT_OPTION_DEFAULT;
    }
    pd__node_t *q = pd__node_wrap(PG_QUERY__NODE__NODE_SELECT_STMT, s);
    if (q == NULL) {
        pd__oom(ctx);
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        if (cols[i] == NULL ||
            !pd__append(&s->target_list, &s->n_target_list,
                        pd__make_res_target(NULL, pd__make_column_ref(NULL, cols[i])))) {
            pd__node_free(q);
            pd__oom(ctx);
            return NULL;
        }
    /* COPY T TO copies T's own rows only, not those of inheritance children: ONLY T. */
    PgQuery__RangeVar *rv = c->relation;
    rv->inh = false;
    c->relation = NULL;
    if (!pd__append(&s->from_clause, &s->n_from_clause,
                    pd__node_wrap(PG_QUERY__NODE__NODE_RANGE_VAR, rv))) {
        pd__node_free(q);
        pd__oom(ctx);
        return NULL;
    }
    return q;
}

/* COPY T TO under reads=new becomes COPY (SELECT ... FROM ONLY T) TO, the SELECT then
   served from the new columns like any other. */
static void rd_copy(pd__ctx_t *ctx, const scope_t *parent, PgQuery__CopyStmt *c)
{
    if (c->query != NULL) {
        rd_stmt(ctx, parent, c->query);
        return;
    }
    const pd__rule_t *r = c->is_from ? NULL : reads_rule(ctx, c->relation);
    if (r == NULL)
        return;
    size_t n = 0;
    const char **cols = copy_columns(ctx, r, c, &n);
    if (cols == NULL)
        return;
    bool reads_old = false;
    const pd__rule_t *pr = NULL;
    for (size_t i = 0; i < n && !reads_old; i++)
        reads_old = cols[i] != NULL && old_pair(ctx, c->relation, cols[i], &pr) != NULL;
    pd__node_t *q = reads_old ? copy_query(ctx, c, cols, n) : NULL;
    free(cols);
    if (q == NULL)
        return;
    for (size_t i = 0; i < c->n_attlist; i++)
        pd__node_free(c->attlist[i]);
    free(c->attlist);
    c->attlist = NULL;
    c->n_attlist = 0;
    c->query = q;
    ctx->changed = true;
    rd_select(ctx, parent, q->select_stmt);
}

static void rd_stmt(pd__ctx_t *ctx, const scope_t *parent, pd__node_t *n)
{
    if (n == NULL || pd__stopped(ctx))
        return;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_SELECT_STMT:
        rd_select(ctx, parent, n->select_stmt);
        break;
    case PG_QUERY__NODE__NODE_INSERT_STMT:
        rd_insert(ctx, parent, n->insert_stmt);
        break;
    case PG_QUERY__NODE__NODE_UPDATE_STMT:
        rd_update(ctx, parent, n->update_stmt);
        break;
    case PG_QUERY__NODE__NODE_DELETE_STMT:
        rd_delete(ctx, parent, n->delete_stmt);
        break;
    case PG_QUERY__NODE__NODE_MERGE_STMT:
        rd_merge(ctx, parent, n->merge_stmt);
        break;
    case PG_QUERY__NODE__NODE_COPY_STMT:
        rd_copy(ctx, parent, n->copy_stmt);
        break;
    case PG_QUERY__NODE__NODE_EXPLAIN_STMT:
        rd_stmt(ctx, parent, n->explain_stmt->query);
        break;
    case PG_QUERY__NODE__NODE_PREPARE_STMT:
        rd_stmt(ctx, parent, n->prepare_stmt->query);
        break;
    case PG_QUERY__NODE__NODE_DECLARE_CURSOR_STMT:
        rd_stmt(ctx, parent, n->declare_cursor_stmt->query);
        break;
    case PG_QUERY__NODE__NODE_CREATE_TABLE_AS_STMT:
        rd_stmt(ctx, parent, n->create_table_as_stmt->query);
        break;
    default:
        break; /* DDL and utility statements read no rows of their own */
    }
}

void pd__rewrite_reads(pd__ctx_t *ctx, pd__node_t *stmt)
{
    bool any = false;
    for (unsigned i = 0; i < pd__col_rules(ctx) && !any; i++)
        any = pd__rule_reads_new(ctx, pd__col_rule(ctx, i));
    if (any)
        rd_stmt(ctx, NULL, stmt);
}
