-- 0026: the database remembers which key its tokens are signed with (a fingerprint, never the key), so that a
-- replica started with another key — a secret left unset, so that it made its own — is refused at start instead
-- of answering 401 to every token the others minted while its readiness says 200 (found by an operator review).
-- One row; `ainarres token --rotate-key` moves it to a new key (docs/operations.md).
CREATE TABLE signing_key (
    one boolean PRIMARY KEY DEFAULT true CONSTRAINT signing_key_one_row CHECK (one),
    algorithm text NOT NULL,
    fingerprint text NOT NULL CONSTRAINT signing_key_fingerprint_format CHECK (fingerprint ~ '^[0-9a-f]{16,64}$'),
    set_at timestamptz NOT NULL DEFAULT now()
);
