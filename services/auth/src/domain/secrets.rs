//! Secrets: password hashes (argon2id, PHC strings), opaque refresh tokens and client secrets
//! (random, stored only as SHA-256), readable client ids and generated passwords.
//!
//! Nothing here logs, and no error carries a secret.

use std::sync::LazyLock;

use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password accepted (hashing cost grows with length).
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// Length of a generated password.
pub const GENERATED_PASSWORD_CHARS: usize = 20;

/// Hashes a password with argon2id (the crate's default parameters) and a random salt.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16 bytes make a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches the PHC string `hash`. A malformed hash matches nothing.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A hash no password is checked against for real: verifying against it when there is no
/// account costs what verifying a real one costs, so timing does not tell whether an account
/// exists.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash_password(&random_token()));

/// Computes the dummy hash now rather than on the first sign-in of an unknown e-mail.
pub fn prepare() {
    LazyLock::force(&DUMMY_HASH);
}

/// Password hashes computed at once: each takes ~19 MiB and a core for tens of milliseconds, so
/// a flood of sign-ins queues here instead of exhausting memory.
static HASHING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    tokio::sync::Semaphore::new(cores * 2)
});

/// Runs argon2 work on the blocking threads, a bounded number at a time.
async fn hashing<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let _permit = HASHING.acquire().await.expect("the hashing semaphore is never closed");
    tokio::task::spawn_blocking(work).await.expect("password hashing does not panic")
}

/// Checks `password` against `hash` off the async threads (argon2 is deliberately slow). With no
/// hash it checks against a dummy one and answers false, taking the same time.
pub async fn check_password(password: &str, hash: Option<&str>) -> bool {
    let password = password.to_string();
    let hash = hash.map(str::to_string);
    hashing(move || match hash {
        Some(hash) => verify_password(&password, &hash),
        None => {
            let _ = verify_password(&password, &DUMMY_HASH);
            false
        }
    })
    .await
}

/// [`hash_password`] off the async threads.
pub async fn hash_password_async(password: &str) -> String {
    let password = password.to_string();
    hashing(move || hash_password(&password)).await
}

/// 32 random bytes, base64url: refresh tokens and client secrets.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A refresh token's successor as stored beside it: the successor's random bytes masked with a
/// pad derived from the presented token, so that only whoever presents that token again can
/// have the successor back (the database keeps neither token).
pub fn seal_successor(presented: &str, successor: &str) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(successor).ok()?;
    let pad = successor_pad(presented);
    (bytes.len() == pad.len()).then(|| bytes.iter().zip(pad).map(|(b, p)| b ^ p).collect())
}

/// The successor [`seal_successor`] stored, given the token presented.
pub fn unseal_successor(presented: &str, sealed: &[u8]) -> Option<String> {
    let pad = successor_pad(presented);
    (sealed.len() == pad.len())
        .then(|| URL_SAFE_NO_PAD.encode(sealed.iter().zip(pad).map(|(b, p)| b ^ p).collect::<Vec<u8>>()))
}

fn successor_pad(presented: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"crm refresh-token successor\0");
    hasher.update(presented.as_bytes());
    hasher.finalize().into()
}

/// What is stored of a token or a client secret.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Compares two hashes in time independent of where they differ.
pub fn same_hash(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Letters and digits that cannot be mistaken for one another (no 0/o, 1/l): 32 of them.
const READABLE: &[u8; 32] = b"23456789abcdefghijkmnpqrstuvwxyz";

/// A service account's client id: "svc-" and 20 readable random characters (100 bits).
pub fn client_id() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    let body: String = bytes.iter().map(|b| READABLE[usize::from(b & 31)] as char).collect();
    format!("svc-{body}")
}

const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";

/// A random password of [`GENERATED_PASSWORD_CHARS`] readable characters (~116 bits).
pub fn generate_password() -> String {
    let mut rng = rand::rng();
    (0..GENERATED_PASSWORD_CHARS)
        .map(|_| PASSWORD_ALPHABET[rng.random_range(0..PASSWORD_ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse battery");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a phc string"));
        assert_ne!(hash, hash_password("correct horse battery"), "salted");
    }

    #[tokio::test]
    async fn checking_without_a_hash_fails() {
        assert!(!check_password("whatever", None).await);
        let hash = hash_password("s3cret-passw0rd");
        assert!(check_password("s3cret-passw0rd", Some(&hash)).await);
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(token_hash(&a).len(), 32);
        assert!(same_hash(&token_hash(&a), &token_hash(&a)));
        assert!(!same_hash(&token_hash(&a), &token_hash(&b)));
        assert!(!same_hash(b"abc", b"ab"));
    }

    #[test]
    fn generated_identifiers_are_readable() {
        let id = client_id();
        assert!(id.starts_with("svc-") && id.len() == 24, "{id}");
        assert!(id[4..].bytes().all(|c| READABLE.contains(&c)));
        let password = generate_password();
        assert_eq!(password.chars().count(), GENERATED_PASSWORD_CHARS);
        assert!(password.bytes().all(|c| PASSWORD_ALPHABET.contains(&c)));
        assert_ne!(password, generate_password());
    }
}
