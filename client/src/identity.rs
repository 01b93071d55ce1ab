//! A store's identity in secure aggregation: its mTLS certificate. The store signs its round
//! keys with its TLS private key, and checks each neighbour's signature with the key of the
//! neighbour's certificate after verifying that certificate against the deployment CA it pins
//! and that it names a store. The coordinator routes the certificates (it saw them in the
//! handshakes) but cannot forge a signature for one, so it cannot substitute keys (issue 12).
//!
//! Without TLS (insecure mode, for local tests only) a store signs with a fresh Ed25519 key,
//! which nothing binds to it.

use fedretail_core::secagg::keys::{self, SigningKey};
use fedretail_core::secagg::protocol::{Identity, ProtocolError, Signer};
use pki_types::{CertificateDer, UnixTime};

/// What signs this store's adverts.
pub enum StoreSigner {
    /// The store's TLS key (Ed25519 or ECDSA P-256).
    Certificate(rcgen::KeyPair),
    /// A fresh Ed25519 key (insecure mode).
    Ephemeral(SigningKey),
}

impl std::fmt::Debug for StoreSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSigner::Certificate(_) => f.write_str("StoreSigner::Certificate"),
            StoreSigner::Ephemeral(k) => write!(f, "StoreSigner::Ephemeral({k:?})"),
        }
    }
}

impl StoreSigner {
    /// The signer of a store with this TLS key (PEM), or an ephemeral one without TLS.
    ///
    /// # Errors
    ///
    /// A key that cannot be read.
    pub fn new(tls_key_pem: Option<&[u8]>) -> Result<StoreSigner, String> {
        match tls_key_pem {
            Some(pem) => {
                let text = std::str::from_utf8(pem).map_err(|_| "the TLS key is not PEM text")?;
                rcgen::KeyPair::from_pem(text)
                    .map(StoreSigner::Certificate)
                    .map_err(|e| format!("the TLS key: {e}"))
            }
            None => {
                let mut rng = fedretail_core::privacy::noise::os_seeded();
                Ok(StoreSigner::Ephemeral(SigningKey::from_seed(&keys::random_seed(&mut rng))))
            }
        }
    }

    /// The bare key to send along in insecure mode (`None` over mTLS: the certificate is).
    pub fn bare_key(&self) -> Option<[u8; 32]> {
        match self {
            StoreSigner::Certificate(_) => None,
            StoreSigner::Ephemeral(k) => Some(k.public()),
        }
    }
}

impl Signer for StoreSigner {
    fn sign_advert(&self, message: &[u8]) -> Vec<u8> {
        use rcgen::SigningKey as _;
        match self {
            StoreSigner::Certificate(k) => k.sign(message).unwrap_or_default(),
            StoreSigner::Ephemeral(k) => k.sign(message).to_vec(),
        }
    }
}

/// Checks a neighbour's advert signature. With a CA (`ca_pem`: this store runs over mTLS) the
/// neighbour must present a store certificate issued by that CA, valid now, and the signature
/// must verify with its key; a bare key is refused. Without a CA, only bare keys are taken.
///
/// # Errors
///
/// [`ProtocolError::Key`] (a signature that does not verify) or [`ProtocolError::Identity`].
pub fn verify(
    ca_pem: Option<&[u8]>,
    identity: &Identity,
    message: &[u8],
    signature: &[u8],
) -> Result<(), ProtocolError> {
    let refuse = |why: String| ProtocolError::Identity(why);
    match (ca_pem, identity) {
        (None, Identity::Key(key)) => Ok(keys::verify(key, message, signature)?),
        (None, Identity::Certificate(_)) => {
            Err(refuse("a certificate, but this store has no CA to check it with".into()))
        }
        (Some(_), Identity::Key(_)) => {
            Err(refuse("a bare key where a store certificate is required".into()))
        }
        (Some(ca_pem), Identity::Certificate(der)) => {
            use pki_types::pem::PemObject;
            let ca = CertificateDer::from_pem_slice(ca_pem)
                .map_err(|e| refuse(format!("the CA certificate: {e}")))?;
            let anchor = webpki::anchor_from_trusted_cert(&ca)
                .map_err(|e| refuse(format!("the CA certificate: {e}")))?;
            let cert = CertificateDer::from(der.as_slice());
            let end = webpki::EndEntityCert::try_from(&cert)
                .map_err(|e| refuse(format!("the neighbour's certificate: {e}")))?;
            end.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                &[],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| refuse(format!("the neighbour's certificate does not verify: {e}")))?;
            let (_, parsed) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| refuse(format!("the neighbour's certificate: {e}")))?;
            let store = parsed
                .subject()
                .iter_organizational_unit()
                .next()
                .and_then(|a| a.as_str().ok())
                .is_some_and(|ou| ou == "store");
            if !store {
                return Err(refuse("the neighbour's certificate is not a store's".into()));
            }
            let ok = [webpki::ring::ED25519, webpki::ring::ECDSA_P256_SHA256]
                .iter()
                .any(|alg| end.verify_signature(*alg, message, signature).is_ok());
            if ok { Ok(()) } else { Err(keys::KeyError::Signature.into()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, issuer: Issuer::new(params, key) }
    }

    /// A leaf of `ca` with this OU (role); its DER and its key as PEM.
    fn leaf(ca: &Ca, ou: &str, alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, String) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "s1");
        params.distinguished_name.push(DnType::OrganizationalUnitName, ou);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_pem())
    }

    /// Issue 12: an advert verifies only with the key of a store certificate from the pinned
    /// CA. A key the coordinator substitutes (another key's signature, a bare key, another CA's
    /// certificate, an administrator's certificate) fails.
    #[test]
    fn only_the_certified_store_key_signs_its_adverts() {
        let (ours, foreign) = (ca(), ca());
        let ca_pem = Some(ours.pem.as_bytes());
        let message = b"fedretail secagg keys: round 1, index 0";
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ED25519] {
            let (der, key) = leaf(&ours, "store", alg);
            let signer = StoreSigner::new(Some(key.as_bytes())).unwrap();
            assert_eq!(signer.bare_key(), None);
            let signature = signer.sign_advert(message);
            let cert = Identity::Certificate(der.clone());
            verify(ca_pem, &cert, message, &signature).unwrap();
            assert!(verify(ca_pem, &cert, b"another message", &signature).is_err());
            // The coordinator's own key signing in the store's name.
            let (_, other_key) = leaf(&ours, "store", alg);
            let forged = StoreSigner::new(Some(other_key.as_bytes())).unwrap().sign_advert(message);
            assert_eq!(
                verify(ca_pem, &cert, message, &forged),
                Err(ProtocolError::Key(keys::KeyError::Signature))
            );
            // A certificate from another CA, or of another role, whatever it signs.
            let (foreign_der, foreign_key) = leaf(&foreign, "store", alg);
            let by_foreign =
                StoreSigner::new(Some(foreign_key.as_bytes())).unwrap().sign_advert(message);
            let refused = verify(ca_pem, &Identity::Certificate(foreign_der), message, &by_foreign);
            assert!(matches!(refused, Err(ProtocolError::Identity(_))), "{refused:?}");
            let (admin_der, admin_key) = leaf(&ours, "operator", alg);
            let by_admin =
                StoreSigner::new(Some(admin_key.as_bytes())).unwrap().sign_advert(message);
            let refused = verify(ca_pem, &Identity::Certificate(admin_der), message, &by_admin);
            assert!(matches!(refused, Err(ProtocolError::Identity(_))), "{refused:?}");
        }
        // Over mTLS a bare key is never taken; without TLS only bare keys are.
        let bare = StoreSigner::new(None).unwrap();
        let key = bare.bare_key().unwrap();
        let signature = bare.sign_advert(message);
        assert!(matches!(
            verify(ca_pem, &Identity::Key(key), message, &signature),
            Err(ProtocolError::Identity(_))
        ));
        verify(None, &Identity::Key(key), message, &signature).unwrap();
    }
}
