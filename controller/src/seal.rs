//! Authenticity and secrecy of archives, with well-kept crates only: Ed25519 signatures of the
//! manifest (`ed25519-dalek`, keys as PKCS#8/SPKI PEM, what `openssl genpkey -algorithm
//! ed25519` writes) and encryption of the whole archive to X25519 recipients in the age
//! format (`age`, interoperable with the `age` command line tool).
//!
//! The signature covers `manifest.json`, which holds the size and digest of every other file
//! and the format version: a valid signature plus a matching manifest vouches for every byte.

use std::{
    io::{BufRead, Read, Write},
    path::Path,
};

use age::secrecy::ExposeSecret;
use anyhow::{bail, Context, Result};
use ed25519_dalek::{
    pkcs8::EncodePublicKey,
    pkcs8::{spki::der::pem::LineEnding, DecodePrivateKey, DecodePublicKey, EncodePrivateKey},
    Signature, Signer, SigningKey, VerifyingKey,
};
use serde::{Deserialize, Serialize};
use stasis_api::layout;

/// What is signed: a fixed context, then the manifest's bytes (a signature made for anything
/// else never verifies here).
const SIGNED_CONTEXT: &[u8] = b"stasis pod checkpoint manifest\0";

/// The start of every age file (binary form).
const AGE_MAGIC: &[u8] = b"age-encryption.org/";

/// How a checkpoint's archive is sealed.
#[derive(Default)]
pub struct Sealing {
    pub sign: Option<SigningKey>,
    pub recipients: Vec<age::x25519::Recipient>,
}

/// How an archive is opened: identities to decrypt it, a key its signature must verify with.
#[derive(Default, Clone)]
pub struct Opening {
    pub identities: Vec<age::x25519::Identity>,
    /// Keys one of which must have signed the archive (none: a signature is not required).
    pub verify: Vec<VerifyingKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureRecord {
    algorithm: String,
    public_key: String,
    signature: String,
}

/// A short, stable name of a public key: the first 16 hex digits of SHA-256 over it.
pub fn fingerprint(key: &VerifyingKey) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key.as_bytes());
    format!("ed25519:{}", hex::encode(&d[..8]))
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    read_checked(path, what, false)
}

/// A file holding a secret key: refused when group or others may read it, as ssh does (the
/// mode of the file actually opened, not of whatever the path names later).
fn read_secret(path: &Path, what: &str) -> Result<String> {
    read_checked(path, what, true)
}

fn read_checked(path: &Path, what: &str, secret: bool) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut file = crate::files::open_nofollow(path)
        .with_context(|| format!("read {what} {}", path.display()))?;
    if secret {
        let mode = file
            .metadata()
            .with_context(|| format!("read {what} {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{what} {} may be read by group or others (mode {:04o}); a key others can read is no secret: chmod 600 it",
                path.display(),
                mode & 0o7777
            );
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("read {what} {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{what} {} is not text", path.display()))
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    SigningKey::from_pkcs8_pem(&read_secret(path, "signing key")?).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an Ed25519 private key in PKCS#8 PEM (stasisctl key generate --type signing, or openssl genpkey -algorithm ed25519): {e}",
            path.display()
        )
    })
}

pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(&read_text(path, "public key")?).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an Ed25519 public key in PEM (the .pub file of stasisctl key generate, or openssl pkey -pubout): {e}",
            path.display()
        )
    })
}

/// An age recipient (`age1…`), or a file of them, one a line (`#` comments allowed).
pub fn load_recipients(arg: &str) -> Result<Vec<age::x25519::Recipient>> {
    if arg.starts_with("AGE-SECRET-KEY-") {
        bail!("--encrypt-to was given an age identity (a secret key), not a recipient: give its public key (age1…); that key is now on a command line, consider it exposed");
    }
    let text = if arg.starts_with("age1") {
        arg.to_string()
    } else {
        read_text(Path::new(arg), "recipients file")?
    };
    let mut out = Vec::new();
    // The text is never echoed: a mistaken identity file holds a secret key.
    let shown = if arg.starts_with("age1") {
        "the recipient"
    } else {
        arg
    };
    for (n, line) in text.lines().map(str::trim).enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("AGE-SECRET-KEY-") {
            bail!(
                "--encrypt-to {shown}: line {} is an age identity (a secret key), not a recipient: give its public key (age1…), never the identity",
                n + 1
            );
        }
        out.push(line.parse::<age::x25519::Recipient>().map_err(|_| {
            anyhow::anyhow!(
                "--encrypt-to {shown}: line {} is not an age X25519 recipient (age1…)",
                n + 1
            )
        })?);
    }
    if out.is_empty() {
        bail!("--encrypt-to {arg}: no recipient in it");
    }
    Ok(out)
}

/// The identities of an age identity file (`AGE-SECRET-KEY-1…` lines, `#` comments).
pub fn load_identities(path: &Path) -> Result<Vec<age::x25519::Identity>> {
    let text = read_secret(path, "identity file")?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(line.parse::<age::x25519::Identity>().map_err(|_| {
            anyhow::anyhow!(
                "{} holds a line that is not an age X25519 identity",
                path.display()
            )
        })?);
    }
    if out.is_empty() {
        bail!("{} holds no identity", path.display());
    }
    Ok(out)
}

/// Signs the manifest of the staged checkpoint `dir` (writes `manifest.sig`, 0600).
pub fn sign_manifest(dir: &Path, key: &SigningKey) -> Result<()> {
    let manifest = std::fs::read(dir.join(layout::MANIFEST)).context("read the manifest")?;
    crate::files::create_file(&dir.join(layout::SIGNATURE), 0o600)?
        .write_all(&signature_record(&manifest, key)?)
        .context("write the signature")
}

/// The signature record (`manifest.sig`'s bytes) of the manifest `manifest`.
pub fn signature_record(manifest: &[u8], key: &SigningKey) -> Result<Vec<u8>> {
    let mut message = SIGNED_CONTEXT.to_vec();
    message.extend_from_slice(manifest);
    let record = SignatureRecord {
        algorithm: "ed25519".into(),
        public_key: hex::encode(key.verifying_key().as_bytes()),
        signature: hex::encode(key.sign(&message).to_bytes()),
    };
    Ok(serde_json::to_vec(&record)?)
}

/// The public key a signature record (`manifest.sig`) names, unverified.
pub fn signer(record: &[u8]) -> Result<VerifyingKey> {
    let record: SignatureRecord =
        serde_json::from_slice(record).context("archive manifest.sig is not a signature record")?;
    public_key_of(&record)
}

fn public_key_of(record: &SignatureRecord) -> Result<VerifyingKey> {
    if record.algorithm != "ed25519" {
        bail!(
            "archive is signed with {:?}; only ed25519 is known",
            record.algorithm
        );
    }
    let bytes: [u8; 32] = hex::decode(&record.public_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("archive manifest.sig names a malformed public key")?;
    VerifyingKey::from_bytes(&bytes).context("archive manifest.sig names an invalid public key")
}

/// The public keys of `path`: a PEM file, or a directory of them (every regular file in
/// it; links are not followed), as the node policy's `trusted_signers` names them.
pub fn load_verifying_keys(path: &Path) -> Result<Vec<VerifyingKey>> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("trusted signers {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![load_verifying_key(path)?]);
    }
    let mut keys = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("read trusted signers {}", path.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_type()?.is_file() {
            keys.push(load_verifying_key(&e.path())?);
        }
    }
    if keys.is_empty() {
        bail!("trusted signers {} holds no public key", path.display());
    }
    Ok(keys)
}

/// Refuses an unpacked archive whose manifest is not signed by one of `keys`.
pub fn check_signature(dir: &Path, keys: &[VerifyingKey]) -> Result<()> {
    let wanted = || keys.iter().map(fingerprint).collect::<Vec<_>>().join(", ");
    let text = match std::fs::read(dir.join(layout::SIGNATURE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "archive is not signed, and a signature by {} is required (--verify-key or the node policy's trusted_signers)",
            wanted()
        ),
        Err(e) => return Err(e).context("read manifest.sig"),
    };
    let record: SignatureRecord =
        serde_json::from_slice(&text).context("archive manifest.sig is not a signature record")?;
    let signer = public_key_of(&record)?;
    let Some(key) = keys.iter().find(|k| **k == signer) else {
        bail!(
            "archive is signed by {}, not by {} (--verify-key or the node policy's trusted_signers)",
            fingerprint(&signer),
            wanted()
        );
    };
    let sig: [u8; 64] = hex::decode(&record.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("archive manifest.sig holds a malformed signature")?;
    let manifest = std::fs::read(dir.join(layout::MANIFEST)).context("read the manifest")?;
    let mut message = SIGNED_CONTEXT.to_vec();
    message.extend_from_slice(&manifest);
    key.verify_strict(&message, &Signature::from_bytes(&sig))
        .map_err(|_| {
            anyhow::anyhow!(
                "archive signature by {} does not match its manifest: the archive was changed after it was signed",
                fingerprint(key)
            )
        })
}

/// Whether the stream starts like an age file.
pub fn is_encrypted(head: &[u8]) -> bool {
    head.starts_with(AGE_MAGIC)
}

/// The plaintext of an age-encrypted archive.
pub fn decrypt<R: BufRead + 'static>(input: R, opening: &Opening) -> Result<Box<dyn Read>> {
    if opening.identities.is_empty() {
        bail!("archive is encrypted (age): pass --identity FILE holding a key it was encrypted to");
    }
    let decryptor = age::Decryptor::new_buffered(input)
        .map_err(|e| anyhow::anyhow!("archive is not a readable age file: {e}"))?;
    let ids = opening.identities.iter().map(|i| i as &dyn age::Identity);
    match decryptor.decrypt(ids) {
        Ok(r) => Ok(Box::new(r)),
        Err(age::DecryptError::NoMatchingKeys) => bail!(
            "archive is encrypted to other recipients: no identity of --identity can decrypt it"
        ),
        Err(e) => bail!("archive cannot be decrypted: {e}"),
    }
}

/// A writer that encrypts to `recipients`; `finish` it to write the last chunk.
pub fn encrypt<W: Write>(
    output: W,
    recipients: &[age::x25519::Recipient],
) -> Result<age::stream::StreamWriter<W>> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| anyhow::anyhow!("encrypt: {e}"))?;
    Ok(encryptor.wrap_output(output)?)
}

/// Kinds of key `stasisctl key generate` makes.
#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    Signing,
    Encryption,
}

/// Writes a new private key to `output` (0600, must not exist) and its public half to
/// `output.pub`; returns the public half as text.
pub fn generate(kind: KeyKind, output: &Path) -> Result<String> {
    let public_path = {
        let mut p = output.as_os_str().to_owned();
        p.push(".pub");
        std::path::PathBuf::from(p)
    };
    let (private, public) = match kind {
        KeyKind::Signing => {
            let key = SigningKey::generate(&mut rand_core::OsRng);
            let private = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("encode the key: {e}"))?;
            let public = key
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("encode the public key: {e}"))?;
            (private.to_string(), public)
        }
        KeyKind::Encryption => {
            let id = age::x25519::Identity::generate();
            let recipient = id.to_public().to_string();
            (
                format!(
                    "# stasis checkpoint identity\n# public key: {recipient}\n{}\n",
                    id.to_string().expose_secret()
                ),
                format!("{recipient}\n"),
            )
        }
    };
    crate::files::create_file(output, 0o600)?.write_all(private.as_bytes())?;
    if let Err(e) = crate::files::create_file(&public_path, 0o644)
        .and_then(|mut f| f.write_all(public.as_bytes()).map_err(Into::into))
    {
        let _ = std::fs::remove_file(output);
        return Err(e);
    }
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("stasis-seal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn secret_keys_readable_by_others_are_refused_and_never_echoed() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("modes");
        let identity = age::x25519::Identity::generate();
        let secret = identity.to_string().expose_secret().to_string();
        let file = d.0.join("id.age");
        crate::files::write_new_private(&file, format!("{secret}\n").as_bytes()).unwrap();
        assert_eq!(load_identities(&file).unwrap().len(), 1);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_identities(&file).err().unwrap().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
        // A mistaken --encrypt-to names the line, never shows it.
        let err = load_recipients(file.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1 is an age identity"), "{err}");
        assert!(
            !err.contains("AGE-SECRET-KEY"),
            "the secret key is in the error: {err}"
        );
        let err = load_recipients(&secret).unwrap_err().to_string();
        assert!(
            !err.contains("AGE-SECRET-KEY"),
            "the secret key is in the error: {err}"
        );
    }

    #[test]
    fn signatures_verify_only_with_their_key_and_manifest() {
        let d = dir("sign");
        let key_path = d.0.join("k.pem");
        generate(KeyKind::Signing, &key_path).unwrap();
        let key = load_signing_key(&key_path).unwrap();
        let public = load_verifying_key(&d.0.join("k.pem.pub")).unwrap();
        assert_eq!(public, key.verifying_key());
        let staged = d.0.join("staged");
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(staged.join(layout::MANIFEST), b"{\"version\":2}").unwrap();
        check_signature(&staged, std::slice::from_ref(&public)).unwrap_err();
        sign_manifest(&staged, &key).unwrap();
        check_signature(&staged, std::slice::from_ref(&public)).unwrap();
        let record = std::fs::read(staged.join(layout::SIGNATURE)).unwrap();
        assert_eq!(signer(&record).unwrap(), public);
        let other = SigningKey::generate(&mut rand_core::OsRng).verifying_key();
        let err = check_signature(&staged, std::slice::from_ref(&other))
            .unwrap_err()
            .to_string();
        assert!(err.contains("signed by"), "{err}");
        std::fs::write(staged.join(layout::MANIFEST), b"{\"version\":3}").unwrap();
        let err = check_signature(&staged, std::slice::from_ref(&public))
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed after it was signed"), "{err}");
        // Existing files are never replaced, and private keys are private.
        assert!(generate(KeyKind::Signing, &key_path).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn encryption_round_trips_and_names_the_wrong_identity() {
        let d = dir("age");
        let recipient = generate(KeyKind::Encryption, &d.0.join("id")).unwrap();
        generate(KeyKind::Encryption, &d.0.join("other")).unwrap();
        let recipients = load_recipients(recipient.trim()).unwrap();
        let mut w = encrypt(Vec::new(), &recipients).unwrap();
        w.write_all(b"pod memory").unwrap();
        let sealed = w.finish().unwrap();
        assert!(is_encrypted(&sealed));
        let open = |id: &str| Opening {
            identities: load_identities(&d.0.join(id)).unwrap(),
            verify: Vec::new(),
        };
        let mut plain = String::new();
        decrypt(std::io::Cursor::new(sealed.clone()), &open("id"))
            .unwrap()
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, "pod memory");
        let err = decrypt(std::io::Cursor::new(sealed.clone()), &open("other"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("other recipients"), "{err}");
        let err = decrypt(std::io::Cursor::new(sealed), &Opening::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--identity"), "{err}");
        // A recipients file works as well as one on the command line.
        std::fs::write(d.0.join("r.txt"), format!("# team\n{recipient}")).unwrap();
        assert_eq!(
            load_recipients(d.0.join("r.txt").to_str().unwrap())
                .unwrap()
                .len(),
            1
        );
    }
}
