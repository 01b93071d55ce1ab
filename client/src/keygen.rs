//! A store's own key pair and certificate request: the private key is made in the store and
//! never leaves it; the coordinator's operator signs the request (`fedretail-coordinator pki
//! sign --csr FILE`).

use std::io::Write;
use std::path::{Path, PathBuf};

/// What `keygen` wrote.
#[derive(Debug, Clone)]
pub struct Keygen {
    /// The private key (mode 0600).
    pub key: PathBuf,
    /// The certificate request to send to the coordinator's operator.
    pub csr: PathBuf,
}

/// Writes `out/STORE.key` and `out/STORE.csr`; refuses to overwrite either.
///
/// # Errors
///
/// A name that is not 1–64 letters, digits, '-', '_' or '.', existing files, I/O errors.
pub fn keygen(store: &str, out: &Path) -> anyhow::Result<Keygen> {
    use anyhow::Context;
    anyhow::ensure!(
        fedretail_core::ids::is_valid_name(store),
        "invalid store name {store:?}: use 1 to 64 letters, digits, '-', '_', '.'"
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_path = out.join(format!("{store}.key"));
    let csr_path = out.join(format!("{store}.csr"));
    for path in [&key_path, &csr_path] {
        anyhow::ensure!(!path.exists(), "{} exists; refusing to overwrite it", path.display());
    }
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, store);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).context("making the certificate request")?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&csr_path, &csr.pem().context("encoding the request")?, false)?;
    Ok(Keygen { key: key_path, csr: csr_path })
}

fn write_new(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_private_key_and_a_request_once() {
        let dir = tempfile::tempdir().unwrap();
        let made = keygen("store-1", dir.path()).unwrap();
        let csr = std::fs::read_to_string(&made.csr).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{csr}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&made.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(keygen("store-1", dir.path()).is_err(), "never overwrites a key");
        assert!(keygen("a/b", dir.path()).is_err());
    }
}
