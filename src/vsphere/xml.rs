//! Hardened XML reading for vCenter's SOAP responses: bytes → a bounded element
//! tree ([`Element`]) that the typed decoders walk.
//!
//! Owns the defences against hostile or broken servers: a size cap (checked before
//! parsing), a nesting-depth cap, an element-count cap, UTF-8 only, no DTD at all
//! (a `<!DOCTYPE` is refused, so no entity can ever be declared or expanded:
//! billion-laughs documents fail fast), only the five predefined entities and
//! character references, and typed errors instead of panics for truncated or
//! arbitrary input. Namespaces are resolved so that `xsi:type` is recognised whatever
//! prefix the server binds (vcsim uses `XMLSchema-instance:type`).
//!
//! Must not know vim25 types: that is `types.rs`.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// The XML Schema instance namespace (`xsi:type`).
pub const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// Parser limits. Defaults suit vim25 responses of paged property collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest document accepted, bytes.
    pub max_bytes: usize,
    /// Deepest element nesting accepted.
    pub max_depth: usize,
    /// Most elements accepted in one document.
    pub max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 32 << 20,
            max_depth: 64,
            max_elements: 500_000,
        }
    }
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Larger than [`Limits::max_bytes`].
    #[error("document larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Nested deeper than [`Limits::max_depth`].
    #[error("elements nested deeper than {limit}")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// More than [`Limits::max_elements`] elements.
    #[error("more than {limit} elements")]
    TooManyElements {
        /// The limit.
        limit: usize,
    },
    /// A document type declaration (DTD): never valid in SOAP, and the vehicle of
    /// entity-expansion attacks.
    #[error("document type declarations (DTD) are not allowed in SOAP messages")]
    Doctype,
    /// A reference to an entity other than the five predefined ones.
    #[error("reference to undeclared entity &{0};")]
    UnknownEntity(String),
    /// Not UTF-8.
    #[error("document is not UTF-8")]
    NotUtf8,
    /// Ends before the root element is closed.
    #[error("document truncated (ends inside <{0}>)")]
    Truncated(String),
    /// No root element.
    #[error("no root element")]
    Empty,
    /// Content after the root element.
    #[error("content after the root element")]
    TrailingContent,
    /// Any other well-formedness error reported by the tokenizer.
    #[error("XML syntax: {0}")]
    Syntax(String),
}

/// One element: local name, the two attributes vim25 uses, text and children.
/// Mixed content is not kept: an element with children keeps no text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name (prefix removed).
    pub name: String,
    /// `xsi:type`, prefix removed (`xsd:string` → `string`).
    pub xsi_type: Option<String>,
    /// Unqualified `type` attribute (managed object references).
    pub type_attr: Option<String>,
    /// Text content (entities resolved), for leaf elements.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Element>,
}

impl Element {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The descendant reached by following `path` (first match at each step).
    pub fn path(&self, path: &[&str]) -> Option<&Element> {
        let mut e = self;
        for p in path {
            e = e.child(p)?;
        }
        Some(e)
    }

    /// Text of the child `name`, if present.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// The `xsi:type` or, when absent, the element name (vim25 fault details are
    /// named `<Type>Fault` with `xsi:type="<Type>"`).
    pub fn type_name(&self) -> &str {
        self.xsi_type.as_deref().unwrap_or(&self.name)
    }
}

fn strip_prefix(s: &str) -> &str {
    s.rsplit_once(':').map(|(_, l)| l).unwrap_or(s)
}

fn syntax(e: impl std::fmt::Display) -> XmlError {
    XmlError::Syntax(e.to_string())
}

fn open_element(reader: &NsReader<&[u8]>, s: &BytesStart<'_>) -> Result<Element, XmlError> {
    let mut el = Element {
        name: strip_prefix(s.name().into_inner()).to_string(),
        ..Element::default()
    };
    for a in s.attributes() {
        let a = a.map_err(syntax)?;
        let (ns, local) = reader.resolver().resolve_attribute(a.key);
        if local.into_inner() != "type" {
            continue;
        }
        let v =
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| match e {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, n),
                    ) => XmlError::UnknownEntity(n),
                    other => syntax(other),
                })?;
        match ns {
            ResolveResult::Bound(n) if n.into_inner() == XSI_NS => {
                el.xsi_type = Some(strip_prefix(&v).to_string())
            }
            ResolveResult::Unbound => el.type_attr = Some(v.into_owned()),
            ResolveResult::Unknown(p) => {
                return Err(XmlError::Syntax(format!("unbound namespace prefix {p:?}")))
            }
            _ => {}
        }
    }
    Ok(el)
}

fn predefined(name: &str) -> Option<char> {
    Some(match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => return None,
    })
}

/// Parse `bytes` into a tree under `limits`. Never panics; every refusal is an
/// [`XmlError`].
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Element, XmlError> {
    if bytes.len() > limits.max_bytes {
        return Err(XmlError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| XmlError::NotUtf8)?;
    let mut reader = NsReader::from_str(text);
    {
        let c = reader.config_mut();
        c.check_end_names = true;
        c.expand_empty_elements = false;
        c.trim_text(false);
    }
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let ev = reader.read_event().map_err(syntax)?;
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                if root.is_some() {
                    return Err(XmlError::TrailingContent);
                }
                count += 1;
                if count > limits.max_elements {
                    return Err(XmlError::TooManyElements {
                        limit: limits.max_elements,
                    });
                }
                if stack.len() >= limits.max_depth {
                    return Err(XmlError::TooDeep {
                        limit: limits.max_depth,
                    });
                }
                let el = open_element(&reader, s)?;
                stack.push(el);
                if matches!(ev, Event::Empty(_)) {
                    close(&mut stack, &mut root);
                }
            }
            Event::End(_) => {
                if stack.is_empty() {
                    return Err(XmlError::Syntax("unmatched end tag".into()));
                }
                close(&mut stack, &mut root);
            }
            Event::Text(t) => {
                let t = t.xml10_content();
                match stack.last_mut() {
                    Some(el) => {
                        if el.children.is_empty() {
                            el.text.push_str(&t);
                        }
                    }
                    None if t.trim().is_empty() => {}
                    None if root.is_some() => return Err(XmlError::TrailingContent),
                    None => return Err(XmlError::Syntax("text outside the root element".into())),
                }
            }
            Event::CData(t) => match stack.last_mut() {
                Some(el) => {
                    if el.children.is_empty() {
                        el.text.push_str(&t.xml10_content());
                    }
                }
                None => return Err(XmlError::Syntax("CDATA outside the root element".into())),
            },
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().map_err(syntax)? {
                    Some(c) => c,
                    None => {
                        let name = r.xml10_content();
                        predefined(&name)
                            .ok_or_else(|| XmlError::UnknownEntity(name.into_owned()))?
                    }
                };
                match stack.last_mut() {
                    Some(el) => {
                        if el.children.is_empty() {
                            el.text.push(c);
                        }
                    }
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
    if let Some(open) = stack.last() {
        return Err(XmlError::Truncated(open.name.clone()));
    }
    root.ok_or(XmlError::Empty)
}

fn close(stack: &mut Vec<Element>, root: &mut Option<Element>) {
    if let Some(mut done) = stack.pop() {
        if !done.children.is_empty() {
            done.text.clear();
        }
        match stack.last_mut() {
            Some(parent) => {
                if parent.children.is_empty() {
                    parent.text.clear();
                }
                parent.children.push(done)
            }
            None => *root = Some(done),
        }
    }
}
