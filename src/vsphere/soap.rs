//! SOAP 1.1 envelopes for vim25: writing requests and unwrapping responses.
//!
//! Owns the envelope shape (namespaces, `xsi:type` on polymorphic values, XML
//! escaping of every value written) and the response side: find the
//! `<Method>Response` element or the `soapenv:Fault` and its vim25 fault detail.
//! Pure functions only: no I/O, no session state. Element order in request bodies
//! follows the vim25 WSDL sequences (vCenter's deserializer is order sensitive).

use super::types::MoRef;
use super::xml::{self, Element, Limits, XmlError};

/// Builder of one request body (the content of `<soapenv:Body>`). Every text and
/// attribute value is escaped.
#[derive(Debug, Default)]
pub struct Body {
    out: String,
}

/// Escape text for element content and attribute values.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['<', '>', '&', '"', '\'']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    std::borrow::Cow::Owned(o)
}

impl Body {
    /// Start `<tag>`.
    pub fn open(&mut self, tag: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(tag);
        self.out.push('>');
        self
    }
    /// Start `<tag xsi:type="ty">` (a polymorphic value).
    pub fn open_typed(&mut self, tag: &str, ty: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(tag);
        self.out.push_str(" xsi:type=\"");
        self.out.push_str(&escape(ty));
        self.out.push_str("\">");
        self
    }
    /// End `</tag>`.
    pub fn close(&mut self, tag: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(tag);
        self.out.push('>');
        self
    }
    /// `<tag>text</tag>`.
    pub fn leaf(&mut self, tag: &str, text: impl std::fmt::Display) -> &mut Self {
        let t = text.to_string();
        self.open(tag);
        self.out.push_str(&escape(&t));
        self.close(tag)
    }
    /// `<tag xsi:type="ty">text</tag>`.
    pub fn leaf_typed(&mut self, tag: &str, ty: &str, text: impl std::fmt::Display) -> &mut Self {
        let t = text.to_string();
        self.open_typed(tag, ty);
        self.out.push_str(&escape(&t));
        self.close(tag)
    }
    /// `<tag type="Kind">value</tag>`: a managed object reference.
    pub fn moref(&mut self, tag: &str, m: &MoRef) -> &mut Self {
        self.out.push('<');
        self.out.push_str(tag);
        self.out.push_str(" type=\"");
        self.out.push_str(&escape(&m.kind));
        self.out.push_str("\">");
        self.out.push_str(&escape(&m.value));
        self.close(tag)
    }
    /// The body text so far.
    pub fn as_str(&self) -> &str {
        &self.out
    }
}

/// A complete envelope calling `method` on `this`; `args` writes the arguments after
/// `_this`, in WSDL order.
pub fn envelope(method: &str, this: &MoRef, args: impl FnOnce(&mut Body)) -> String {
    let mut b = Body::default();
    b.out.push('<');
    b.out.push_str(method);
    b.out.push_str(" xmlns=\"urn:vim25\">");
    b.moref("_this", this);
    args(&mut b);
    b.close(method);
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<soapenv:Envelope \
         xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>{}</soapenv:Body></soapenv:Envelope>",
        b.out
    )
}

/// A SOAP fault as vCenter sends it: `faultstring` plus the vim25 fault object in
/// `detail` (element `<TypeFault xsi:type="Type">`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// vim25 fault type (`InvalidLogin`, `NotAuthenticated`, `FileFault`...), or the
    /// SOAP `faultcode` when there is no vim25 detail.
    pub fault_type: String,
    /// `faultstring` (often empty on vCenter; the type then says it all).
    pub message: String,
    /// The fault object's fields (for `ManagedObjectNotFound.obj`,
    /// `NoPermission.privilegeId`...).
    pub detail: Option<Box<Element>>,
}

impl Fault {
    /// Build from a vim25 `LocalizedMethodFault` (`{ fault xsi:type, localizedMessage }`),
    /// as found in `TaskInfo.error` and `MissingProperty.fault`.
    pub fn from_localized(e: &Element) -> Fault {
        let inner = e.child("fault");
        Fault {
            fault_type: inner
                .map(|f| f.type_name().to_string())
                .unwrap_or_else(|| "MethodFault".into()),
            message: e.child_text("localizedMessage").unwrap_or("").to_string(),
            detail: inner.cloned().map(Box::new),
        }
    }

    /// A text field of the fault detail, e.g. `privilegeId`.
    pub fn detail_text(&self, name: &str) -> Option<&str> {
        self.detail.as_ref().and_then(|d| d.child_text(name))
    }

    /// A one-line description: `Type: message` (or just the type).
    pub fn summary(&self) -> String {
        if self.message.trim().is_empty() {
            self.fault_type.clone()
        } else {
            format!("{}: {}", self.fault_type, self.message.trim())
        }
    }
}

/// Why a response could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The server answered with a SOAP fault.
    #[error("{}", .0.summary())]
    Fault(Fault),
    /// Not XML we accept.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// XML, but not the expected SOAP shape.
    #[error("{0}")]
    Shape(String),
}

/// Unwrap a response to `method`: the `<methodResponse>` element (whose optional
/// `returnval` children are the result), or the fault.
pub fn parse_response(
    bytes: &[u8],
    method: &str,
    limits: &Limits,
) -> Result<Element, ResponseError> {
    let root = xml::parse(bytes, limits)?;
    if root.name != "Envelope" {
        return Err(ResponseError::Shape(format!(
            "expected a SOAP Envelope, got <{}>",
            root.name
        )));
    }
    let body = root
        .child("Body")
        .ok_or_else(|| ResponseError::Shape("SOAP Envelope without Body".into()))?;
    if let Some(f) = body.child("Fault") {
        return Err(ResponseError::Fault(parse_fault(f)));
    }
    let want = format!("{method}Response");
    body.children
        .iter()
        .find(|c| c.name == want)
        .cloned()
        .ok_or_else(|| {
            ResponseError::Shape(format!(
                "expected <{want}> in the SOAP Body, got {}",
                body.children
                    .first()
                    .map(|c| format!("<{}>", c.name))
                    .unwrap_or_else(|| "nothing".into())
            ))
        })
}

fn parse_fault(f: &Element) -> Fault {
    let code = f.child_text("faultcode").unwrap_or("").to_string();
    let message = f.child_text("faultstring").unwrap_or("").to_string();
    let detail = f
        .child("detail")
        .and_then(|d| d.children.first())
        .cloned()
        .map(Box::new);
    let fault_type = match &detail {
        Some(d) => match &d.xsi_type {
            Some(t) => t.clone(),
            None => d.name.strip_suffix("Fault").unwrap_or(&d.name).to_string(),
        },
        None if code.is_empty() => "SoapFault".into(),
        None => code.rsplit(':').next().unwrap_or(&code).to_string(),
    };
    Fault {
        fault_type,
        message,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_escapes_values_and_names_this() {
        let e = envelope(
            "Login",
            &MoRef::new("SessionManager", "SessionManager"),
            |b| {
                b.leaf("userName", "a&b<c>");
                b.leaf("password", "p\"'");
            },
        );
        assert!(e.contains(
            "<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">SessionManager</_this>"
        ));
        assert!(e.contains("<userName>a&amp;b&lt;c&gt;</userName>"));
        assert!(e.contains("<password>p&quot;&apos;</password>"));
        // The envelope is well-formed: our own parser reads it back.
        let root = xml::parse(e.as_bytes(), &Limits::default()).unwrap();
        let login = root.path(&["Body", "Login"]).unwrap();
        assert_eq!(login.child_text("userName"), Some("a&b<c>"));
        assert_eq!(
            login.child("_this").unwrap().type_attr.as_deref(),
            Some("SessionManager")
        );
    }

    #[test]
    fn faults_are_typed_from_the_detail() {
        let x = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        match parse_response(x, "Login", &Limits::default()) {
            Err(ResponseError::Fault(f)) => {
                assert_eq!(f.fault_type, "InvalidLogin");
                assert_eq!(f.message, "Login failure");
            }
            other => panic!("{other:?}"),
        }
        // Without xsi:type the element name minus "Fault" gives the type.
        let x = br#"<Envelope><Body><Fault><faultcode>ServerFaultCode</faultcode><faultstring/><detail><ManagedObjectNotFoundFault><obj type="VirtualMachine">vm-9</obj></ManagedObjectNotFoundFault></detail></Fault></Body></Envelope>"#;
        match parse_response(x, "X", &Limits::default()) {
            Err(ResponseError::Fault(f)) => {
                assert_eq!(f.fault_type, "ManagedObjectNotFound");
                assert_eq!(f.detail_text("obj"), Some("vm-9"));
            }
            other => panic!("{other:?}"),
        }
        // A bare SOAP fault (no vim25 detail) keeps the fault code.
        let x = br#"<Envelope><Body><Fault><faultcode>soapenv:Client</faultcode><faultstring>bad</faultstring></Fault></Body></Envelope>"#;
        match parse_response(x, "X", &Limits::default()) {
            Err(ResponseError::Fault(f)) => assert_eq!(f.summary(), "Client: bad"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        for (x, m) in [
            (&b"<html><body>proxy error</body></html>"[..], "Envelope"),
            (b"<Envelope/>", "without Body"),
            (
                b"<Envelope><Body><OtherResponse/></Body></Envelope>",
                "<OtherResponse>",
            ),
        ] {
            match parse_response(x, "Login", &Limits::default()) {
                Err(ResponseError::Shape(s)) => assert!(s.contains(m), "{s}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
