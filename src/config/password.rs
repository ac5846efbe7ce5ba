//! Workbench-compatible encryption of the registry database password
//! (`sessionlb encrypt-password`, and encrypted `password=` values in a
//! Workbench `database.conf` or the native `database-password` key).
//!
//! Workbench's scheme ("v0", as implemented by Posit's `rskey`):
//! `hash ‖ base64(iv32 ‖ AES-128-CBC(key', PKCS#7)) ‖ hash`, where `hash` is
//! the CRC32 of the raw secure cookie key as 8 upper-case hex digits, `key'`
//! is the first 16 bytes of the key XORed with a fixed 10-byte pad, and the
//! 32-byte IV field holds the 16-byte IV first. The CRC only tells which key
//! encrypted a value; the secrecy is the key's.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as B64};

type Encryptor = cbc::Encryptor<aes::Aes128>;
type Decryptor = cbc::Decryptor<aes::Aes128>;

/// Decodes with or without `=` padding (rskey has written both).
const B64_DECODE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Workbench's `OBFUSCATE_KEY` pad.
const PAD: [u8; 10] = [223, 99, 111, 160, 122, 212, 223, 105, 37, 190];
const IV_FIELD: usize = 32;

/// Why a value does not decrypt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the value is not an encrypted password (expected <8 hex digits><base64><the same 8 hex digits>)")]
    NotEncrypted,
    #[error("the password was encrypted with another secure cookie key (key hash {found}, this key's {expected})")]
    WrongKey { found: String, expected: String },
    #[error("the encrypted password is corrupt")]
    Corrupt,
    #[error(
        "the password was encrypted with unsupported encryption version {0}; sessionlb reads version 0, Workbench's default: encrypt it again with `sessionlb encrypt-password` (or `rstudio-server encrypt-password` with the maximum encryption version at 0)"
    )]
    UnsupportedVersion(u8),
    #[error("the secure cookie key must be at least 16 bytes to encrypt passwords")]
    ShortKey,
}

/// The key's CRC32 as Workbench prints it: 8 upper-case hex digits.
pub fn key_hash(key: &[u8]) -> String {
    format!("{:08X}", crc32fast::hash(key))
}

fn aes_key(key: &[u8]) -> Result<[u8; 16], PasswordError> {
    if key.len() < 16 {
        return Err(PasswordError::ShortKey);
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = key[i] ^ PAD[i % PAD.len()];
    }
    Ok(out)
}

/// Whether a configured value has the shape of an encrypted password.
pub fn looks_encrypted(value: &str) -> bool {
    value.len() > 16
        && value.is_ascii()
        && value[..8].bytes().all(|b| b.is_ascii_hexdigit())
        && value[..8] == value[value.len() - 8..]
}

/// Encrypt `plain` with the secure cookie key.
pub fn encrypt(key: &[u8], plain: &str) -> Result<String, PasswordError> {
    let k = aes_key(key)?;
    let iv_field: [u8; IV_FIELD] = rand::random();
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&iv_field[..16]);
    let cipher = Encryptor::new(&k.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plain.as_bytes());
    let mut payload = iv_field.to_vec();
    payload.extend_from_slice(&cipher);
    let hash = key_hash(key);
    Ok(format!("{hash}{}{hash}", B64.encode(payload)))
}

/// Decrypt a value made by `encrypt` (or by Workbench) with the same key.
pub fn decrypt(key: &[u8], value: &str) -> Result<String, PasswordError> {
    if !looks_encrypted(value) {
        return Err(PasswordError::NotEncrypted);
    }
    let expected = key_hash(key);
    let found = &value[..8];
    if !found.eq_ignore_ascii_case(&expected) {
        return Err(PasswordError::WrongKey { found: found.to_string(), expected });
    }
    let payload = B64_DECODE.decode(&value[8..value.len() - 8]).map_err(|_| PasswordError::Corrupt)?;
    if payload.len() <= IV_FIELD {
        return Err(PasswordError::Corrupt);
    }
    let buffer = &payload[IV_FIELD..];
    // Versions 1 and up start the buffer with their version byte; as
    // Workbench does, a buffer that also decrypts as version 0 is version 0.
    let unsupported = || match buffer[0] {
        0 => PasswordError::Corrupt,
        version => PasswordError::UnsupportedVersion(version),
    };
    if !buffer.len().is_multiple_of(16) {
        return Err(unsupported());
    }
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&payload[..16]);
    let plain = Decryptor::new(&aes_key(key)?.into(), &iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(buffer)
        .map_err(|_| unsupported())?;
    String::from_utf8(plain).map_err(|_| unsupported())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"d3161166-e89b-4158-af3b-5980e3056cc6\n";

    #[test]
    fn decrypts_posit_rskey_test_vector() {
        assert_eq!(key_hash(KEY), "BFA25145");
        let vector = "BFA25145OoPWwVZMdN/K7eDJUD5gLg916yildo6m+XG0+Sld7r+SuKXS3Rsi/TC0qbVZ5uCMBFA25145";
        assert_eq!(decrypt(KEY, vector).unwrap(), "success");
    }

    #[test]
    fn round_trips_and_refuses_other_keys_and_corruption() {
        let enc = encrypt(KEY, "p@ss wörd").unwrap();
        assert!(looks_encrypted(&enc));
        assert_eq!(decrypt(KEY, &enc).unwrap(), "p@ss wörd");
        assert_ne!(encrypt(KEY, "p@ss wörd").unwrap(), enc, "random IV");
        let other = b"ffffffff-e89b-4158-af3b-5980e3056cc6\n";
        assert!(matches!(decrypt(other, &enc), Err(PasswordError::WrongKey { .. })));
        let mut bad = enc.clone();
        bad.replace_range(20..24, "AAAA");
        assert!(decrypt(KEY, &bad).is_err());
        assert_eq!(decrypt(KEY, "plain-password"), Err(PasswordError::NotEncrypted));
        assert_eq!(encrypt(b"short", "x"), Err(PasswordError::ShortKey));
    }

    /// A value framed as Workbench frames it: hash, base64(IV field ‖ buffer), hash.
    fn framed(buffer: &[u8]) -> String {
        let mut payload = vec![7u8; IV_FIELD];
        payload.extend_from_slice(buffer);
        let hash = key_hash(KEY);
        format!("{hash}{}{hash}", B64.encode(payload))
    }

    #[test]
    fn later_encryption_versions_are_named_not_decrypted_into_garbage() {
        // Version 1: a version byte, then AES-128-CBC blocks (length 1 + 16k).
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&[0x5a; 32]);
        assert_eq!(decrypt(KEY, &framed(&v1)), Err(PasswordError::UnsupportedVersion(1)));
        // Version 2: a version byte, GCM ciphertext of the password's length, a 16-byte tag.
        let mut v2 = vec![2u8];
        v2.extend_from_slice(b"ciphertext");
        v2.extend_from_slice(&[0xa5; 16]);
        assert_eq!(decrypt(KEY, &framed(&v2)), Err(PasswordError::UnsupportedVersion(2)));
        // ...also when its length happens to be a whole number of blocks.
        let mut v2 = vec![2u8];
        v2.extend_from_slice(&[0x33; 15 + 16]);
        assert_eq!(decrypt(KEY, &framed(&v2)), Err(PasswordError::UnsupportedVersion(2)));
        let message = PasswordError::UnsupportedVersion(2).to_string();
        assert!(message.starts_with("the password was encrypted with unsupported encryption version 2;"), "{message}");
        // Version 0 values decrypt whatever their first byte (here the rskey vector's).
        let vector = "BFA25145OoPWwVZMdN/K7eDJUD5gLg916yildo6m+XG0+Sld7r+SuKXS3Rsi/TC0qbVZ5uCMBFA25145";
        assert_eq!(decrypt(KEY, vector).unwrap(), "success");
        // Without `=` padding (some rskey versions) it decodes too.
        let padded = encrypt(KEY, "a twenty char secret").unwrap();
        assert!(padded.contains("=="), "{padded}");
        assert_eq!(decrypt(KEY, &padded.replace('=', "")).unwrap(), "a twenty char secret");
    }
}
