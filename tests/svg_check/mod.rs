//! A small well-formedness check for the SVG the commands write: balanced elements under one
//! `<svg>` root, quoted attributes, only the five XML entities (or numeric ones), and no NaN or
//! infinity in any number.

pub fn check_svg(s: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut roots = 0;
    let mut rest = s.trim_start();
    if let Some(r) = rest.strip_prefix("<?xml") {
        rest = &r[r.find("?>").ok_or("unclosed XML declaration")? + 2..];
    }
    while !rest.is_empty() {
        match rest.find('<') {
            None => {
                text(rest)?;
                if !rest.trim().is_empty() {
                    return Err(format!("text after the root: {:?}", rest.trim()));
                }
                break;
            }
            Some(i) => {
                let t = &rest[..i];
                text(t)?;
                if stack.is_empty() && !t.trim().is_empty() {
                    return Err(format!("text outside the root: {t:?}"));
                }
                rest = &rest[i..];
            }
        }
        if let Some(r) = rest.strip_prefix("<!--") {
            rest = &r[r.find("-->").ok_or("unclosed comment")? + 3..];
            continue;
        }
        let end = tag_end(rest).ok_or_else(|| format!("unclosed tag at {:?}", head(rest)))?;
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let name = name.trim();
            match stack.pop() {
                Some(open) if open == name => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name_end = body.find(|c: char| c.is_whitespace()).unwrap_or(body.len());
        let name = &body[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '-')
        {
            return Err(format!("bad element name {name:?}"));
        }
        attributes(&body[name_end..]).map_err(|e| format!("<{name}>: {e}"))?;
        if stack.is_empty() {
            roots += 1;
            if name != "svg" {
                return Err(format!("the root is <{name}>, not <svg>"));
            }
        }
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    if let Some(open) = stack.pop() {
        return Err(format!("<{open}> is never closed"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(())
}

fn head(s: &str) -> &str {
    &s[..s.len().min(40)]
}

/// The index of the `>` closing the tag at the start of `s`, skipping quoted values.
fn tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices().skip(1) {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            (None, '<') => return None,
            _ => {}
        }
    }
    None
}

fn attributes(mut s: &str) -> Result<(), String> {
    let mut seen = Vec::new();
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return Ok(());
        }
        let eq = s
            .find('=')
            .ok_or_else(|| format!("attribute without a value: {s:?}"))?;
        let name = s[..eq].trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-:_".contains(c))
        {
            return Err(format!("bad attribute name {name:?}"));
        }
        if seen.contains(&name) {
            return Err(format!("duplicate attribute {name}"));
        }
        seen.push(name);
        let v = s[eq + 1..].trim_start();
        let q = v
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or("unquoted value")?;
        let close = v[1..].find(q).ok_or("unterminated value")? + 1;
        let value = &v[1..close];
        text(value)?;
        if value.contains('<') {
            return Err(format!("'<' in the value of {name}"));
        }
        for word in value.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-')) {
            let w = word.to_ascii_lowercase();
            if w == "nan" || w.contains("inf") && w.parse::<f64>().is_ok() {
                return Err(format!("{name}=\"{value}\" is not a finite number"));
            }
        }
        s = &v[close + 1..];
    }
}

/// Character data: '&' only as an entity.
fn text(s: &str) -> Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        let after = &rest[i + 1..];
        let semi = after
            .find(';')
            .ok_or_else(|| format!("bare '&' in {:?}", head(rest)))?;
        let ent = &after[..semi];
        let ok = matches!(ent, "amp" | "lt" | "gt" | "quot" | "apos")
            || ent.strip_prefix('#').is_some_and(|n| {
                n.parse::<u32>().is_ok()
                    || n.strip_prefix('x')
                        .is_some_and(|h| u32::from_str_radix(h, 16).is_ok())
            });
        if !ok {
            return Err(format!("unknown entity &{ent};"));
        }
        rest = &after[semi + 1..];
    }
    Ok(())
}

#[test]
fn the_checker_catches_broken_svg() {
    assert!(check_svg(r#"<svg a="1"><g><text x="1">a &amp; b</text></g></svg>"#).is_ok());
    assert!(check_svg(r#"<svg><g></svg>"#).is_err());
    assert!(check_svg(r#"<svg><text>a & b</text></svg>"#).is_err());
    assert!(check_svg(r#"<svg x=1></svg>"#).is_err());
    assert!(check_svg(r#"<svg><circle cx="NaN"/></svg>"#).is_err());
    assert!(check_svg(r#"<svg></svg><svg></svg>"#).is_err());
    assert!(check_svg(r#"<g></g>"#).is_err());
}
