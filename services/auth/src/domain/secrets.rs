//! Secrets: password hashes (argon2id, PHC strings), opaque refresh tokens and client secrets
//! (random, stored only as SHA-256), readable client ids and generated passwords.
//!
//! Nothing here logs, and no error carries a secret.

use std::sync::LazyLock;

use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crm_kit::ApiError;
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
    hash_with(password, &mut Vec::new())
}

/// Whether `password` matches the PHC string `hash`. A malformed hash matches nothing.
pub fn verify_password(password: &str, hash: &str) -> bool {
    verify_with(password, hash, &mut Vec::new())
}

/// [`hash_password`] in `memory` (grown to what argon2 needs, then reused).
fn hash_with(password: &str, memory: &mut Vec<Block>) -> String {
    let mut raw_salt = [0u8; 16];
    rand::rng().fill_bytes(&mut raw_salt);
    let salt = SaltString::encode_b64(&raw_salt).expect("16 bytes make a valid salt");
    let params = Params::default();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    Argon2::from(params.clone())
        .hash_password_into_with_memory(password.as_bytes(), &raw_salt, &mut out, blocks(memory, params.block_count()))
        .expect("argon2 with default parameters hashes any password");
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).expect("default parameters format"),
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).expect("a 32-byte output")),
    };
    hash.to_string()
}

/// [`verify_password`] in `memory`.
fn verify_with(password: &str, hash: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Ok(algorithm), Ok(params), Some(salt), Some(expected)) =
        (Algorithm::try_from(parsed.algorithm), Params::try_from(&parsed), parsed.salt, parsed.hash)
    else {
        return false;
    };
    let version = parsed.version.map_or(Ok(Version::V0x13), Version::try_from).unwrap_or(Version::V0x13);
    let mut raw_salt = [0u8; 64];
    let Ok(raw_salt) = salt.decode_b64(&mut raw_salt) else { return false };
    let mut out = vec![0u8; expected.len()];
    let Ok(params) = Params::new(params.m_cost(), params.t_cost(), params.p_cost(), Some(expected.len())) else {
        return false;
    };
    let memory = blocks(memory, params.block_count());
    let argon2 = Argon2::new(algorithm, version, params);
    if argon2.hash_password_into_with_memory(password.as_bytes(), raw_salt, &mut out, memory).is_err() {
        return false;
    }
    same_hash(&out, expected.as_bytes())
}

/// The first `count` blocks of `memory`, grown to hold them if need be (and kept for reuse).
fn blocks(memory: &mut Vec<Block>, count: usize) -> &mut [Block] {
    if memory.len() < count {
        memory.resize(count, Block::new());
    }
    &mut memory[..count]
}

/// A hash no password is checked against for real: verifying against it when there is no
/// account costs what verifying a real one costs, so timing does not tell whether an account
/// exists.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| hash_password(&random_token()));

/// Computes the dummy hash now rather than on the first sign-in of an unknown e-mail.
pub fn prepare() {
    LazyLock::force(&DUMMY_HASH);
}

/// How long a password check waits for its turn before the caller is told to come back.
pub const HASHING_QUEUE_DEADLINE: Duration = Duration::from_secs(5);

/// Every argon2 use goes through here: as many at once as the machine has cores (at most 4),
/// each in a memory buffer of its own that is kept and reused (~19 MiB each), so that a flood of
/// sign-ins queues — for at most [`HASHING_QUEUE_DEADLINE`], then RESOURCE_EXHAUSTED — instead
/// of allocating, and memory stays flat.
struct Hashers {
    permits: tokio::sync::Semaphore,
    buffers: std::sync::Mutex<Vec<Vec<Block>>>,
}

static HASHERS: LazyLock<Hashers> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    Hashers { permits: tokio::sync::Semaphore::new(cores.clamp(1, 4)), buffers: Default::default() }
});

/// Runs argon2 work on the blocking threads, with a pooled buffer, a bounded number at a time.
async fn hashing<T: Send + 'static>(work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static) -> Result<T, ApiError> {
    let permit = tokio::time::timeout(HASHING_QUEUE_DEADLINE, HASHERS.permits.acquire())
        .await
        .map_err(|_| ApiError::ResourceExhausted("too many password checks at once; retry shortly".into()))?
        .expect("the hashing semaphore is never closed");
    let mut buffer =
        HASHERS.buffers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default();
    let (result, buffer) = tokio::task::spawn_blocking(move || {
        let result = work(&mut buffer);
        (result, buffer)
    })
    .await
    .expect("password hashing does not panic");
    HASHERS.buffers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(buffer);
    drop(permit);
    Ok(result)
}

/// Checks `password` against `hash` off the async threads (argon2 is deliberately slow). With no
/// hash it checks against a dummy one and answers false, taking the same time and memory.
pub async fn check_password(password: &str, hash: Option<&str>) -> Result<bool, ApiError> {
    let password = password.to_string();
    let hash = hash.map(str::to_string);
    hashing(move |memory| match hash {
        Some(hash) => verify_with(&password, &hash, memory),
        None => {
            let _ = verify_with(&password, &DUMMY_HASH, memory);
            false
        }
    })
    .await
}

/// [`hash_password`] off the async threads.
pub async fn hash_password_async(password: &str) -> Result<String, ApiError> {
    let password = password.to_string();
    hashing(move |memory| hash_with(&password, memory)).await
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

    #[test]
    fn hashes_are_standard_phc_strings() {
        use argon2::{PasswordHasher, PasswordVerifier};
        // Ours verify with the crate's own verifier, and the crate's verify with ours.
        let ours = hash_password("correct horse battery");
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse battery", &parsed).is_ok());
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default().hash_password(b"correct horse battery", &salt).unwrap().to_string();
        assert!(verify_password("correct horse battery", &theirs));
        assert!(!verify_password("wrong", &theirs));
        // Other parameters (an older hash) verify too, in the same reused buffer.
        let light = Argon2::from(Params::new(8 * 1024, 1, 1, None).unwrap());
        let older = light.hash_password(b"pw-older-params", &salt).unwrap().to_string();
        let mut memory = Vec::new();
        assert!(verify_with("pw-older-params", &older, &mut memory));
        assert!(verify_with("correct horse battery", &theirs, &mut memory));
        assert_eq!(memory.len(), Params::default().block_count(), "the buffer grows once, to the largest need");
    }

    #[tokio::test]
    async fn checking_without_a_hash_fails() {
        assert!(!check_password("whatever", None).await.unwrap());
        let hash = hash_password("s3cret-passw0rd");
        assert!(check_password("s3cret-passw0rd", Some(&hash)).await.unwrap());
        assert!(!check_password("wrong-passw0rd", Some(&hash)).await.unwrap());
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
