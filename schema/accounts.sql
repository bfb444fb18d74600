-- cdcddp accounts: users and their resume (login) tokens. Idempotent: safe to run again.
--
-- Publish only `username`, `emails` and `profile` of `users` (cdcddp.methods.accounts declares
-- that publication). `password_hash` holds argon2id(sha256-hex(password)) and must never be
-- published; `login_tokens` must never be published at all.

CREATE TABLE IF NOT EXISTS users (
    id            text PRIMARY KEY CHECK (id <> ''),  -- Meteor-style 17-character random id
    username      text CHECK (username <> ''),
    -- Meteor's shape: [{"address": "a@b.c", "verified": false}, ...]
    emails        jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(emails) = 'array'),
    profile       jsonb,
    password_hash text CHECK (password_hash IS NULL OR password_hash LIKE '$argon2id$%'),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Meteor refuses a username or email that differs from an existing one only by case.
CREATE UNIQUE INDEX IF NOT EXISTS users_username_lower_key ON users (lower(username));

-- One row per address: case-insensitive uniqueness and lookup for login by email. Kept in step
-- with users.emails (which is what clients see) by the accounts code, in the same transaction.
CREATE TABLE IF NOT EXISTS user_emails (
    user_id text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    address text NOT NULL CHECK (address <> ''),
    PRIMARY KEY (user_id, address)
);
CREATE UNIQUE INDEX IF NOT EXISTS user_emails_address_lower_key ON user_emails (lower(address));

CREATE TABLE IF NOT EXISTS login_tokens (
    -- base64(sha256(token)), as Meteor's services.resume.loginTokens[].hashedToken
    hashed_token text PRIMARY KEY,
    user_id      text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),  -- Meteor's `when`
    expires_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS login_tokens_user_id_idx ON login_tokens (user_id);
CREATE INDEX IF NOT EXISTS login_tokens_expires_at_idx ON login_tokens (expires_at);
