//! The deployment's certificate authority: who is a store, who administers, and in what role.
//!
//! A certificate's subject says who its holder is: `CN` is the name (a store's name, an
//! administrator's name) and `OU` the role (`store`, `operator`, `auditor`, `exporter`,
//! `coordinator`). The coordinator trusts only its own CA, reads the identity from the verified
//! certificate, and never from a request field.
//!
//! Layout of a PKI directory (`pki init --out DIR`):
//!
//! ```text
//! DIR/ca.crt  DIR/ca.key (0600)                 the CA; stores and admins pin ca.crt
//! DIR/coordinator.crt  DIR/coordinator.key      the coordinator's server certificate
//! DIR/stores/NAME.crt  DIR/stores/NAME.key      store certificates (issue-store, or sign a CSR)
//! DIR/admins/NAME.crt  DIR/admins/NAME.key      administrator certificates with their role
//! DIR/issued.log                                one line per certificate: serial, role, name
//! ```

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Organisation name written into every certificate's subject.
const ORGANISATION: &str = "fedretail";

/// What a certificate's holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A store: may enrol as itself and take part in training.
    Store,
    /// An administrator who reads status and the audit log.
    Auditor,
    /// An administrator who also creates, pauses, resumes and cancels tasks.
    Operator,
    /// An administrator who exports models.
    Exporter,
    /// The coordinator's own server certificate.
    Coordinator,
}

impl Role {
    /// The name written in the certificate's `OU`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Store => "store",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::Exporter => "exporter",
            Role::Coordinator => "coordinator",
        }
    }

    /// Parses [`Role::as_str`].
    pub fn parse(s: &str) -> Option<Role> {
        [Role::Store, Role::Auditor, Role::Operator, Role::Exporter, Role::Coordinator]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    /// Whether this is an administrator's role.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Auditor | Role::Operator | Role::Exporter)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("{context}: {source}")]
    Cert {
        /// What was being done.
        context: String,
        /// The error.
        source: rcgen::Error,
    },
    /// A name is unusable.
    #[error(
        "invalid name {0:?}: use 1 to 64 characters from letters, digits, '-', '_' and '.', not starting with '.'"
    )]
    BadName(String),
    /// A file exists and would be overwritten.
    #[error("{0} exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// The CSR asks for something a store certificate cannot be.
    #[error("certificate request {path}: {message}")]
    BadRequest {
        /// The CSR file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

fn cert(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let context = context.into();
    move |source| PkiError::Cert { context, source }
}

/// Checks a store or administrator name: it becomes a file name and appears in logs.
///
/// # Errors
///
/// [`PkiError::BadName`].
pub fn check_name(name: &str) -> Result<(), PkiError> {
    if fedretail_core::ids::is_valid_name(name) {
        Ok(())
    } else {
        // Echo at most 64 characters: the name may be huge or carry forged log lines.
        Err(PkiError::BadName(name.chars().take(64).collect()))
    }
}

/// The files of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    /// The PKI in `root`.
    pub fn new(root: impl Into<PathBuf>) -> PkiDir {
        PkiDir { root: root.into() }
    }

    /// The CA certificate every party pins.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    /// The CA's private key (mode 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The coordinator's certificate.
    pub fn coordinator_cert(&self) -> PathBuf {
        self.root.join("coordinator.crt")
    }
    /// The coordinator's private key.
    pub fn coordinator_key(&self) -> PathBuf {
        self.root.join("coordinator.key")
    }
    /// A store's certificate and key.
    pub fn store(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join("stores");
        (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")))
    }
    /// An administrator's certificate and key.
    pub fn admin(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join("admins");
        (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")))
    }
    /// The log of issued certificates.
    pub fn issued_log(&self) -> PathBuf {
        self.root.join("issued.log")
    }

    /// Loads the CA key and certificate as an issuer.
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = read(&self.ca_key())?;
        let key = KeyPair::from_pem(&key).map_err(cert(format!("{}", self.ca_key().display())))?;
        let ca = read(&self.ca_cert())?;
        Issuer::from_ca_cert_pem(&ca, key).map_err(cert(format!("{}", self.ca_cert().display())))
    }

    fn log_issued(&self, serial: &str, role: Role, name: &str) -> Result<(), PkiError> {
        let path = self.issued_log();
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        writeln!(f, "{serial} {role} {name}").map_err(io(&path))?;
        f.sync_data().map_err(io(&path))
    }
}

/// What issuing a certificate produced.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file, if the key was made here (not for a signed CSR).
    pub key: Option<PathBuf>,
    /// The serial number in lower-case hex: what a revocation file lists.
    pub serial: String,
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Writes `text` to a new file, with mode 0600 for private keys.
fn write_new(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_path_buf())
        } else {
            PkiError::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// 16 random bytes from the OS with the top bit cleared (a positive serial).
fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the OS random source works");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte: the hex form stays the DER form
    SerialNumber::from_slice(&bytes)
}

/// Lower-case hex of a serial's bytes, as revocation files and logs write it.
pub fn serial_hex(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match hex.trim_start_matches('0') {
        "" => "0".into(),
        trimmed => trimmed.into(),
    }
}

/// The current calendar year, for validity periods.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

fn subject(name: &str, role: Role) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, name);
    dn
}

/// Parameters of a leaf certificate for `name` in `role`, valid for `years`.
fn leaf_params(name: &str, role: Role, years: i32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
    params.serial_number = Some(random_serial());
    params.distinguished_name = subject(name, role);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if role == Role::Coordinator {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    params
}

/// `pki init`: a new CA and the coordinator's certificate for `hosts` (DNS names or IP
/// addresses the stores connect to).
///
/// # Errors
///
/// Existing files are never overwritten; I/O and generation errors.
pub fn init(dir: &PkiDir, hosts: &[String]) -> Result<Issued, PkiError> {
    for path in [dir.ca_cert(), dir.ca_key(), dir.coordinator_cert(), dir.coordinator_key()] {
        if path.exists() {
            return Err(PkiError::Exists(path));
        }
    }
    let ca_key = KeyPair::generate().map_err(cert("generating the CA key"))?;
    let mut ca = CertificateParams::default();
    let year = this_year();
    ca.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    ca.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    dn.push(DnType::CommonName, "fedretail deployment CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(cert("signing the CA"))?;
    write_new(&dir.ca_key(), &ca_key.serialize_pem(), true)?;
    write_new(&dir.ca_cert(), &ca_cert.pem(), false)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut params = leaf_params("fedretail-coordinator", Role::Coordinator, 5);
    for host in hosts {
        params.subject_alt_names.push(match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.clone().try_into().map_err(cert(format!("host name {host:?}")))?,
            ),
        });
    }
    issue(dir, params, Role::Coordinator, "fedretail-coordinator", &issuer, |_| {
        (dir.coordinator_cert(), dir.coordinator_key())
    })
}

fn issue(
    dir: &PkiDir,
    params: CertificateParams,
    role: Role,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    paths: impl FnOnce(&str) -> (PathBuf, PathBuf),
) -> Result<Issued, PkiError> {
    let (cert_path, key_path) = paths(name);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::Exists(path.clone()));
        }
    }
    let key = KeyPair::generate().map_err(cert(format!("generating a key for {name}")))?;
    let serial = serial_hex(&params.serial_number.as_ref().expect("leaf params set it").to_bytes());
    let signed = params.signed_by(&key, issuer).map_err(cert(format!("signing {name}")))?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &signed.pem(), false)?;
    dir.log_issued(&serial, role, name)?;
    Ok(Issued { cert: cert_path, key: Some(key_path), serial })
}

/// `pki issue-store`: a store certificate and key made here.
///
/// # Errors
///
/// A bad name, existing files, a missing CA; I/O and generation errors.
pub fn issue_store(dir: &PkiDir, name: &str) -> Result<Issued, PkiError> {
    check_name(name)?;
    let issuer = dir.issuer()?;
    issue(dir, leaf_params(name, Role::Store, 2), Role::Store, name, &issuer, |n| dir.store(n))
}

/// `pki issue-admin`: an administrator certificate carrying `role`.
///
/// # Errors
///
/// A bad name or a role that is not an administrator's; as [`issue_store`].
pub fn issue_admin(dir: &PkiDir, name: &str, role: Role) -> Result<Issued, PkiError> {
    check_name(name)?;
    if !role.is_admin() {
        return Err(PkiError::BadName(format!("{name} (role {role} is not an admin role)")));
    }
    let issuer = dir.issuer()?;
    issue(dir, leaf_params(name, role, 1), role, name, &issuer, |n| dir.admin(n))
}

/// `pki sign`: signs a store's certificate request (its key never left the store). Only the
/// request's common name and public key are used: whatever else it asks for, the result is a
/// store certificate, so a request cannot make itself an administrator.
///
/// # Errors
///
/// An unreadable or unverifiable request, a bad name, an existing certificate.
pub fn sign_store_csr(dir: &PkiDir, csr: &Path) -> Result<Issued, PkiError> {
    let text = read(csr)?;
    let bad = |message: String| PkiError::BadRequest { path: csr.to_path_buf(), message };
    let request =
        CertificateSigningRequestParams::from_pem(&text).map_err(|e| bad(e.to_string()))?;
    let name = match request.params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
        Some(DnValue::Ia5String(s)) => s.as_str().to_string(),
        _ => return Err(bad("it has no common name (the store's name)".into())),
    };
    check_name(&name)?;
    let issuer = dir.issuer()?;
    let (cert_path, _) = dir.store(&name);
    if cert_path.exists() {
        return Err(PkiError::Exists(cert_path));
    }
    let params = leaf_params(&name, Role::Store, 2);
    let serial = serial_hex(&params.serial_number.as_ref().expect("leaf params set it").to_bytes());
    let signed = CertificateSigningRequestParams { params, public_key: request.public_key }
        .signed_by(&issuer)
        .map_err(cert(format!("signing {name}")))?;
    write_new(&cert_path, &signed.pem(), false)?;
    dir.log_issued(&serial, Role::Store, &name)?;
    Ok(Issued { cert: cert_path, key: None, serial })
}

/// Makes a fresh PKI in `dir` for `stores` and `admins`: what the simulator and tests use, so
/// the real mTLS path is the one they exercise.
///
/// # Errors
///
/// As [`init`], [`issue_store`] and [`issue_admin`].
pub fn ephemeral(dir: &Path, stores: &[&str], admins: &[(&str, Role)]) -> Result<PkiDir, PkiError> {
    let pki = PkiDir::new(dir);
    init(&pki, &["localhost".into(), "127.0.0.1".into()])?;
    for store in stores {
        issue_store(&pki, store)?;
    }
    for (name, role) in admins {
        issue_admin(&pki, name, *role)?;
    }
    Ok(pki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["store-1", "zip_0", "a.b", "A"] {
            check_name(good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "new\nline", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn init_refuses_to_overwrite_and_keeps_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        init(&pki, &["localhost".into()]).unwrap();
        assert!(matches!(init(&pki, &[]), Err(PkiError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [pki.ca_key(), pki.coordinator_key()] {
                let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        let issued = issue_store(&pki, "s1").unwrap();
        assert!(matches!(issue_store(&pki, "s1"), Err(PkiError::Exists(_))));
        let log = std::fs::read_to_string(pki.issued_log()).unwrap();
        assert!(log.contains(&format!("{} store s1", issued.serial)), "{log}");
        assert!(issue_admin(&pki, "x", Role::Store).is_err());
    }

    #[test]
    fn serial_hex_drops_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0, 0x1a, 0x02]), "1a02");
        assert_eq!(serial_hex(&[0x0a, 0x02]), "a02", "as revocation files are normalised");
        assert_eq!(serial_hex(&[0]), "0");
    }
}
