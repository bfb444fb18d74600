-- The Todos example app (Meteor's todos): lists and their todos. Idempotent: safe to run again.
-- Needs schema/accounts.sql first (lists.user_id references users).

CREATE TABLE IF NOT EXISTS lists (
    id               text PRIMARY KEY CHECK (id <> ''),
    name             text NOT NULL,
    -- Denormalised count of unchecked todos, kept right by the todos methods in the same
    -- transaction as the change that moves it.
    incomplete_count integer NOT NULL DEFAULT 0 CHECK (incomplete_count >= 0),
    user_id          text NULL REFERENCES users (id) ON DELETE CASCADE  -- NULL: a public list
);
CREATE INDEX IF NOT EXISTS lists_user_id_idx ON lists (user_id);

CREATE TABLE IF NOT EXISTS todos (
    id         text PRIMARY KEY CHECK (id <> ''),
    list_id    text NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    text       text NOT NULL,
    checked    boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS todos_list_id_idx ON todos (list_id);
