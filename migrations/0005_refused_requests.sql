-- Schema 5: requests refused for want of authentication, counted rather than logged one
-- by one, so that a stranger's flood costs a row per source address and period (about a
-- minute), never a row per request. `routes` names what was asked for and how often:
-- 'POST /ports x1200, GET /vms x3'.

CREATE TABLE refused_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    since        TEXT    NOT NULL,
    until        TEXT    NOT NULL,
    client_addr  TEXT    NOT NULL,
    requests     INTEGER NOT NULL,
    routes       TEXT    NOT NULL
);
CREATE INDEX refused_requests_until ON refused_requests (until);
