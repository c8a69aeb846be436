-- The successor a refresh token was exchanged for: its hash, and the token itself sealed with a
-- pad only the exchanged token derives (see secrets::seal_successor), so that the token presented
-- again within the reuse grace gets the same successor.
ALTER TABLE refresh_tokens ADD COLUMN successor_hash BLOB;
ALTER TABLE refresh_tokens ADD COLUMN successor BLOB;
