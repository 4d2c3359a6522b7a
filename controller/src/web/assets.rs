//! The map page's files, compiled into the controller: the page loads nothing from anywhere
//! else (no CDN; the page's Content-Security-Policy forbids it too).

/// The page.
pub const INDEX: &str = include_str!("assets/index.html");
/// Its script: polling, the table, the SVG force layout.
pub const SCRIPT: &str = include_str!("assets/map.js");
/// Its style sheet.
pub const STYLE: &str = include_str!("assets/map.css");

/// Content type and body of the asset at `path`, if it is one.
pub fn get(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/map.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/map.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing in the page points off this server: no scheme-qualified or protocol-relative
    /// URL in a `src`, `href`, `url(...)`, `import` or `fetch`.
    #[test]
    fn assets_reference_nothing_outside_the_controller() {
        for (name, text) in [
            ("index.html", INDEX),
            ("map.js", SCRIPT),
            ("map.css", STYLE),
        ] {
            let lower = text.to_ascii_lowercase();
            for needle in [
                "http://",
                "https://",
                "src=\"//",
                "href=\"//",
                "url(//",
                "url(\"//",
                "@import",
                "import(",
                "wss://",
                "ws://",
            ] {
                // The SVG namespace is an identifier, not a fetch.
                let hits = lower.matches(needle).count()
                    - lower.matches("http://www.w3.org/2000/svg").count()
                        * usize::from(needle == "http://");
                assert_eq!(hits, 0, "{name} has {needle:?}");
            }
            assert!(!lower.contains("<link rel=\"preconnect\""), "{name}");
        }
        assert!(INDEX.contains("src=\"/map.js\"") && INDEX.contains("href=\"/map.css\""));
    }
}
