/*
 * report_html.h — the cutover readiness report (admin/report.h) as one self-contained
 * HTML page: inline CSS, an inline SVG chart of divergence over time, tables; no scripts,
 * no external resources, so that it reads offline and can be attached to a change ticket.
 * Used by pgdualctl; needs only jansson.
 */
#ifndef PD_ADMIN_REPORT_HTML_H
#define PD_ADMIN_REPORT_HTML_H

#include <jansson.h>
#include <stdio.h>

/* Writes the page for `report` (the reply's "report" member). 0, or -1 when out writes
 * failed. Every text from the report is escaped: rule names and statements are user data. */
int pd_report_html(FILE *out, json_t *report);

/* s with & < > " ' replaced by character references, safe in text and quoted attribute
 * values; malloc'd (NULL when out of memory). */
char *pd_html_escape(const char *s);

/* The history entries (the newest `newest` of them; 0: all) as flat rows for tables:
 * {time, what ("flags of RULE" or the event), by, detail (the other fields as JSON)}. */
json_t *pd_report_history_rows(json_t *history, size_t newest);

#endif /* PD_ADMIN_REPORT_HTML_H */
