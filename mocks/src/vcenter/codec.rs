//! The SOAP codec: parse a vim25 request into a small bounded element tree, and write
//! responses and faults as vim25 XML (SOAP 1.1 envelope, `urn:vim25` default
//! namespace, `xsi:type` on polymorphic values).
//!
//! Untrusted input: the parser refuses DTDs (so no entity expansion of any kind),
//! unknown entities, too deep or too many elements, and returns a typed error for
//! everything else; it never panics. It knows nothing of the inventory.

use quick_xml::events::Event;
use quick_xml::Reader;
use std::fmt::Write as _;

/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Most elements accepted in one request.
pub const MAX_ELEMENTS: usize = 100_000;

/// Why a request body is not a usable SOAP request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Not well-formed XML (or not UTF-8).
    #[error("malformed XML: {0}")]
    Syntax(String),
    /// A `<!DOCTYPE>`: refused (no entity definitions accepted).
    #[error("DTDs are not accepted in SOAP requests")]
    Doctype,
    /// An entity other than the five predefined ones or a character reference.
    #[error("unknown entity &{0};")]
    Entity(String),
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("elements nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// More than [`MAX_ELEMENTS`] elements.
    #[error("more than {MAX_ELEMENTS} elements")]
    TooMany,
    /// Well-formed XML that is not a SOAP request (no Envelope/Body/method).
    #[error("not a SOAP request: {0}")]
    NotSoap(String),
}

/// An element: local name, attributes (qualified names as written), children, text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name (prefix stripped).
    pub name: String,
    /// Attributes as `(qualified name, unescaped value)`.
    pub attrs: Vec<(String, String)>,
    /// Child elements in order.
    pub children: Vec<Element>,
    /// Concatenated character data directly inside this element.
    pub text: String,
}

impl Element {
    /// First child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Trimmed text of the first child named `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    /// Unprefixed attribute `name` (e.g. a ManagedObjectReference's `type`).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `xsi:type` attribute (any prefix), without a namespace prefix in the value.
    pub fn xsi_type(&self) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k.ends_with(":type"))
            .map(|(_, v)| v.rsplit(':').next().unwrap_or(v))
    }
}

fn local(qname: &str) -> String {
    qname.rsplit(':').next().unwrap_or(qname).to_string()
}

fn start_element(e: &quick_xml::events::BytesStart<'_>) -> Result<Element, XmlError> {
    let mut el = Element {
        name: local(e.name().as_ref()),
        ..Default::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|e| XmlError::Syntax(e.to_string()))?;
        let key = a.key.as_ref().to_string();
        let value =
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| match e {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                    ) => XmlError::Entity(name),
                    other => XmlError::Syntax(other.to_string()),
                })?
                .into_owned();
        el.attrs.push((key, value));
    }
    Ok(el)
}

/// Parse a whole document into its root element.
pub fn parse(body: &[u8]) -> Result<Element, XmlError> {
    let text = std::str::from_utf8(body).map_err(|e| XmlError::Syntax(e.to_string()))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| XmlError::Syntax(e.to_string()))?;
        match ev {
            Event::Start(e) | Event::Empty(e) if root.is_some() => {
                let _ = e;
                return Err(XmlError::Syntax("content after the root element".into()));
            }
            Event::Start(e) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooMany);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                stack.push(start_element(&e)?);
            }
            Event::Empty(e) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooMany);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                let el = start_element(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| XmlError::Syntax("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let s = t.xml10_content();
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&s),
                    None if s.trim().is_empty() => {}
                    None => return Err(XmlError::Syntax("text outside the root element".into())),
                }
            }
            Event::CData(t) => {
                let s = t.xml10_content();
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&s),
                    None => return Err(XmlError::Syntax("CDATA outside the root element".into())),
                }
            }
            Event::GeneralRef(r) => {
                let ch = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => {
                        let name = r.xml10_content();
                        match name.as_ref() {
                            "lt" => "<".into(),
                            "gt" => ">".into(),
                            "amp" => "&".into(),
                            "apos" => "'".into(),
                            "quot" => "\"".into(),
                            other => {
                                return Err(XmlError::Entity(other.chars().take(64).collect()))
                            }
                        }
                    }
                    Err(e) => return Err(XmlError::Syntax(e.to_string())),
                };
                match stack.last_mut() {
                    Some(el) => el.text.push_str(&ch),
                    None => {
                        return Err(XmlError::Syntax(
                            "reference outside the root element".into(),
                        ))
                    }
                }
            }
            Event::DocType(_) => return Err(XmlError::Doctype),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Syntax("document ends inside an element".into()));
    }
    root.ok_or_else(|| XmlError::Syntax("empty document".into()))
}

/// A managed object reference (`<x type="VirtualMachine">vm-12</x>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    /// Managed object type.
    pub ty: String,
    /// Its id.
    pub value: String,
}

impl MoRef {
    /// A reference of type `ty` to `value`.
    pub fn new(ty: &str, value: impl Into<String>) -> MoRef {
        MoRef {
            ty: ty.to_string(),
            value: value.into(),
        }
    }

    /// Read a reference from an element (`type` attribute + text).
    pub fn from_element(e: &Element) -> Option<MoRef> {
        let ty = e.attr("type")?;
        let v = e.text.trim();
        (!ty.is_empty() && !v.is_empty()).then(|| MoRef::new(ty, v))
    }
}

/// A parsed SOAP request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method name (the Body's first element).
    pub method: String,
    /// `_this`.
    pub this: MoRef,
    /// The method element (arguments are its children).
    pub body: Element,
}

/// Parse a SOAP request envelope.
pub fn parse_request(body: &[u8]) -> Result<Request, XmlError> {
    let root = parse(body)?;
    if root.name != "Envelope" {
        return Err(XmlError::NotSoap(format!(
            "root element is <{}>, not <Envelope>",
            root.name
        )));
    }
    let b = root
        .child("Body")
        .ok_or_else(|| XmlError::NotSoap("no <Body>".into()))?;
    let m = b
        .children
        .first()
        .ok_or_else(|| XmlError::NotSoap("empty <Body>".into()))?;
    let this = m
        .child("_this")
        .and_then(MoRef::from_element)
        .ok_or_else(|| XmlError::NotSoap(format!("<{}> has no valid <_this> reference", m.name)))?;
    Ok(Request {
        method: m.name.clone(),
        this,
        body: m.clone(),
    })
}

/// A vim25 value to serialize.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    /// `xsd:string`.
    Str(String),
    /// `xsd:boolean`.
    Bool(bool),
    /// `xsd:int`.
    Int(i32),
    /// `xsd:long`.
    Long(i64),
    /// `xsd:dateTime` (already formatted).
    Time(String),
    /// An enumeration value: (enum type name, value).
    Enum(&'static str, String),
    /// A managed object reference.
    Ref(MoRef),
    /// A data object.
    Obj(Obj),
    /// An array: (element type for `ArrayOf<T>`, items).
    Arr(&'static str, Vec<Val>),
    /// A value in a slot declared `anyType` (`DynamicProperty.val`,
    /// `TaskInfo.result`): written with its `xsi:type`.
    Any(Box<Val>),
}

/// A data object: its vim25 type and its fields in schema order.
#[derive(Clone, Debug, PartialEq)]
pub struct Obj {
    /// vim25 type name (`VirtualDisk`).
    pub ty: &'static str,
    /// Fields (unset fields are simply absent).
    pub fields: Vec<(&'static str, Val)>,
}

impl Obj {
    /// An object of type `ty` with no fields yet.
    pub fn new(ty: &'static str) -> Obj {
        Obj {
            ty,
            fields: Vec::new(),
        }
    }
    /// Add a field.
    pub fn f(mut self, name: &'static str, v: Val) -> Obj {
        self.fields.push((name, v));
        self
    }
    /// Add a field when `v` is set.
    pub fn opt(mut self, name: &'static str, v: Option<Val>) -> Obj {
        if let Some(v) = v {
            self.fields.push((name, v));
        }
        self
    }
    /// A field by name.
    pub fn get(&self, name: &str) -> Option<&Val> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

impl Val {
    /// A string value.
    pub fn s(s: impl Into<String>) -> Val {
        Val::Str(s.into())
    }
    /// A managed object reference value.
    pub fn r(ty: &str, v: impl Into<String>) -> Val {
        Val::Ref(MoRef::new(ty, v))
    }
    /// An array of references of type `ty`.
    pub fn refs(ty: &str, ids: impl IntoIterator<Item = String>) -> Val {
        Val::Arr(
            "ManagedObjectReference",
            ids.into_iter().map(|v| Val::r(ty, v)).collect(),
        )
    }
    /// The `xsi:type` this value has where the declared type is `anyType`.
    pub fn any_type(&self) -> String {
        match self {
            Val::Str(_) => "xsd:string".into(),
            Val::Bool(_) => "xsd:boolean".into(),
            Val::Int(_) => "xsd:int".into(),
            Val::Long(_) => "xsd:long".into(),
            Val::Time(_) => "xsd:dateTime".into(),
            Val::Enum(t, _) => (*t).into(),
            Val::Ref(_) => "ManagedObjectReference".into(),
            Val::Obj(o) => o.ty.into(),
            Val::Arr(t, _) => format!("ArrayOf{}", capitalize(t)),
            Val::Any(v) => v.any_type(),
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Escape text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\r' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// Write `<name>value</name>`; `any` adds `xsi:type` (declared type anyType).
/// Arrays in a field are repeated elements; an `any` array is an `ArrayOfX` wrapper.
pub fn write_val(out: &mut String, name: &str, v: &Val, any: bool) {
    let xt = |out: &mut String| {
        if any {
            let _ = write!(out, " xsi:type=\"{}\"", v.any_type());
        }
    };
    match v {
        Val::Any(inner) => write_val(out, name, inner, true),
        Val::Arr(elem, items) => {
            if any {
                let _ = write!(out, "<{name}");
                xt(out);
                out.push('>');
                for it in items {
                    // ArrayOfString holds <string>, ArrayOfManagedObjectReference
                    // holds <ManagedObjectReference>, ArrayOfVirtualDevice holds
                    // <VirtualDevice xsi:type="VirtualDisk">.
                    write_val(out, elem, it, matches!(it, Val::Obj(_)));
                }
                let _ = write!(out, "</{name}>");
            } else {
                for it in items {
                    write_val(out, name, it, false);
                }
            }
        }
        Val::Ref(r) => {
            let _ = write!(out, "<{name}");
            xt(out);
            let _ = write!(out, " type=\"{}\">{}</{name}>", esc(&r.ty), esc(&r.value));
        }
        Val::Obj(o) => {
            // Data objects always carry their type: polymorphic slots need it and
            // it is harmless elsewhere.
            let _ = write!(out, "<{name} xsi:type=\"{}\">", o.ty);
            for (n, fv) in &o.fields {
                write_val(out, n, fv, false);
            }
            let _ = write!(out, "</{name}>");
        }
        scalar => {
            let _ = write!(out, "<{name}");
            xt(out);
            out.push('>');
            match scalar {
                Val::Str(s) | Val::Time(s) | Val::Enum(_, s) => out.push_str(&esc(s)),
                Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Val::Int(i) => {
                    let _ = write!(out, "{i}");
                }
                Val::Long(i) => {
                    let _ = write!(out, "{i}");
                }
                _ => {}
            }
            let _ = write!(out, "</{name}>");
        }
    }
}

const ENVELOPE_START: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8"?>"#,
    "\n",
    r#"<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
    "\n<soapenv:Body>"
);
const ENVELOPE_END: &str = "</soapenv:Body>\n</soapenv:Envelope>";

/// What a method returns.
#[derive(Clone, Debug, PartialEq)]
pub enum Returns {
    /// Nothing (`<XResponse/>`).
    Void,
    /// A value of a statically known type (no `xsi:type` needed at the top).
    Typed(Val),
    /// A value whose declared type is `anyType` (Fetch): carries `xsi:type`.
    Any(Val),
    /// An array result: each item is a `returnval` element.
    Many(Vec<Val>),
}

/// A `<method>Response` envelope.
pub fn response(method: &str, ret: &Returns) -> String {
    let mut out = String::from(ENVELOPE_START);
    let _ = write!(out, "<{method}Response xmlns=\"urn:vim25\">");
    match ret {
        Returns::Void => {}
        Returns::Typed(v) => write_val(&mut out, "returnval", v, false),
        Returns::Any(v) => write_val(&mut out, "returnval", v, true),
        Returns::Many(items) => {
            for v in items {
                write_val(&mut out, "returnval", v, false);
            }
        }
    }
    let _ = write!(out, "</{method}Response>");
    out.push_str(ENVELOPE_END);
    out
}

/// A vim25 fault: the fault object and a message for people.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// The fault data object (`InvalidLogin`, `FileFault { file }`...).
    pub obj: Obj,
    /// Human readable message (SOAP `faultstring`, task `localizedMessage`).
    pub message: String,
}

impl Fault {
    /// A fault of type `ty` with `fields` and a message.
    pub fn new(ty: &'static str, message: impl Into<String>) -> Fault {
        Fault {
            obj: Obj::new(ty),
            message: message.into(),
        }
    }
    /// Add a field to the fault object.
    pub fn f(mut self, name: &'static str, v: Val) -> Fault {
        self.obj.fields.push((name, v));
        self
    }
    /// The `LocalizedMethodFault` value used in `TaskInfo.error`.
    pub fn localized(&self) -> Val {
        Val::Obj(
            Obj::new("LocalizedMethodFault")
                .f("fault", Val::Obj(self.obj.clone()))
                .f("localizedMessage", Val::s(&self.message)),
        )
    }
}

/// A SOAP fault envelope (sent with HTTP 500).
pub fn fault(f: &Fault) -> String {
    let mut out = String::from(ENVELOPE_START);
    let _ = write!(
        out,
        "<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{}</faultstring><detail><{ty}Fault xmlns=\"urn:vim25\" xsi:type=\"{ty}\">",
        esc(&f.message),
        ty = f.obj.ty
    );
    for (n, v) in &f.obj.fields {
        write_val(&mut out, n, v, false);
    }
    let _ = write!(out, "</{}Fault></detail></soapenv:Fault>", f.obj.ty);
    out.push_str(ENVELOPE_END);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LOGIN: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
<soapenv:Body><Login xmlns="urn:vim25"><_this versionId="8.0.3.0" type="SessionManager">SessionManager</_this><userName versionId="8.0.3.0">a&amp;b&#x41;</userName><password><![CDATA[p<w]]></password></Login></soapenv:Body>
</soapenv:Envelope>"#;

    #[test]
    fn parses_a_pyvmomi_request() {
        let r = parse_request(LOGIN.as_bytes()).unwrap();
        assert_eq!(r.method, "Login");
        assert_eq!(r.this, MoRef::new("SessionManager", "SessionManager"));
        assert_eq!(r.body.text_of("userName"), Some("a&bA"));
        assert_eq!(r.body.text_of("password"), Some("p<w"));
    }

    #[test]
    fn refuses_dtds_entities_depth_and_garbage() {
        let laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><Envelope><Body><x>&lol2;</x></Body></Envelope>"#;
        assert_eq!(parse(laughs.as_bytes()), Err(XmlError::Doctype));
        assert_eq!(parse(b"<a>&foo;</a>"), Err(XmlError::Entity("foo".into())));
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(deep.as_bytes()), Err(XmlError::TooDeep));
        let many = format!("<a>{}</a>", "<b/>".repeat(MAX_ELEMENTS + 1));
        assert_eq!(parse(many.as_bytes()), Err(XmlError::TooMany));
        assert!(matches!(parse(b"<a><b></a>"), Err(XmlError::Syntax(_))));
        assert!(matches!(parse(b"<a>"), Err(XmlError::Syntax(_))));
        assert!(matches!(parse(b""), Err(XmlError::Syntax(_))));
        assert!(matches!(parse(b"<a/><b/>"), Err(XmlError::Syntax(_))));
        assert!(matches!(
            parse_request(b"<Envelope><Body><Login/></Body></Envelope>"),
            Err(XmlError::NotSoap(_))
        ));
    }

    #[test]
    fn writes_typed_values() {
        let v = Val::Arr(
            "VirtualDevice",
            vec![Val::Obj(
                Obj::new("VirtualDisk").f("key", Val::Int(2000)).f(
                    "deviceInfo",
                    Val::Obj(Obj::new("Description").f("label", Val::s("a<b"))),
                ),
            )],
        );
        let mut out = String::new();
        write_val(&mut out, "val", &v, true);
        assert_eq!(
            out,
            r#"<val xsi:type="ArrayOfVirtualDevice"><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo xsi:type="Description"><label>a&lt;b</label></deviceInfo></VirtualDevice></val>"#
        );
        let mut out = String::new();
        write_val(
            &mut out,
            "val",
            &Val::refs("Datastore", ["datastore-1".to_string()]),
            true,
        );
        assert_eq!(
            out,
            r#"<val xsi:type="ArrayOfManagedObjectReference"><ManagedObjectReference type="Datastore">datastore-1</ManagedObjectReference></val>"#
        );
        let mut out = String::new();
        write_val(
            &mut out,
            "val",
            &Val::Arr("string", vec![Val::s("x")]),
            true,
        );
        assert_eq!(
            out,
            r#"<val xsi:type="ArrayOfString"><string>x</string></val>"#
        );
        let f = fault(&Fault::new("FileFault", "bad & worse").f("file", Val::s("[ds] a.vmdk")));
        assert!(f.contains("<faultstring>bad &amp; worse</faultstring>"));
        assert!(f.contains(r#"<FileFaultFault xmlns="urn:vim25" xsi:type="FileFault"><file>[ds] a.vmdk</file></FileFaultFault>"#));
        // Our own output parses back.
        parse(f.as_bytes()).unwrap();
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_request(&body);
        }

        #[test]
        fn truncated_and_mutated_requests_never_panic(cut in 0usize..LOGIN.len(), at in 0usize..LOGIN.len(), b in any::<u8>()) {
            let _ = parse_request(&LOGIN.as_bytes()[..cut]);
            let mut m = LOGIN.as_bytes().to_vec();
            m[at] = b;
            let _ = parse_request(&m);
        }

        #[test]
        fn xml_like_soup_never_panics(parts in proptest::collection::vec(
            prop_oneof![
                Just("<a>".to_string()), Just("</a>".to_string()), Just("<b x='1'/>".to_string()),
                Just("&amp;".to_string()), Just("&#x0;".to_string()), Just("&#99999999;".to_string()),
                Just("<![CDATA[".to_string()), Just("]]>".to_string()), Just("<!--".to_string()),
                Just("<!DOCTYPE".to_string()), Just("<?xml ?>".to_string()), Just("\"".to_string()),
                "[a-z<>/&;=\"' ]{0,8}",
            ], 0..64)) {
            let s: String = parts.concat();
            let _ = parse_request(s.as_bytes());
        }
    }
}
