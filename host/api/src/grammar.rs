//! Structured output: OpenAI's `response_format` turned into a llama.cpp grammar (GBNF) that
//! constrains sampling, so the answer is JSON (`json_object`) or JSON of a given schema
//! (`json_schema`).
//!
//! The schema subset enforced: `type` (one or a list of `object`, `array`, `string`, `number`,
//! `integer`, `boolean`, `null`), `properties` with `required` (required ones first, in the
//! schema's order, then the optional ones, each optional), `items`, `minItems`/`maxItems`,
//! `enum`, `const`, `anyOf`, `minLength`/`maxLength` on strings; `title`, `description`,
//! `default`, `examples`, `$schema`, `$id`, `additionalProperties` and `strict` are accepted (a
//! generated object never has properties beyond the schema's). Anything else a grammar cannot
//! enforce (`pattern`, `format`, `minimum`, `$ref`, `oneOf`, …) is refused with a 400 that names
//! the keyword, rather than promised and not kept.

use serde_json::Value;

use crate::error::ApiError;

/// Whitespace between tokens, bounded so a small model cannot pad for ever.
const WS: &str = r#"ws ::= | " " | "\n" [ \t]{0,20}"#;

const BASE: &str = r#"value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" char* "\"" ws
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
number ::= integer ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
integer ::= "-"? ([0-9] | [1-9] [0-9]{0,15})"#;

/// Keywords the grammar ignores on purpose (they do not constrain what may be generated, or
/// the generated object satisfies them anyway).
const IGNORED: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "additionalProperties",
    "strict",
    "$comment",
];

fn refuse(keyword: &str) -> ApiError {
    ApiError::invalid(
        "response_format",
        "unsupported_schema",
        format!("the JSON schema keyword {keyword:?} cannot be enforced by this host's sampler; remove it"),
    )
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid("response_format", "invalid_response_format", message)
}

/// A JSON value as a GBNF literal (the exact characters of its compact JSON form).
fn literal(v: &Value) -> String {
    let text = v.to_string();
    let escaped: String = text
        .chars()
        .map(|c| match c {
            '"' => "\\\"".to_string(),
            '\\' => "\\\\".to_string(),
            '\n' => "\\n".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!("\"{escaped}\" ws")
}

struct Builder {
    rules: Vec<String>,
}

impl Builder {
    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.rules.len());
        self.rules.push(format!("{name} ::= {body}"));
        name
    }

    fn schema(&mut self, s: &Value, depth: usize) -> Result<String, ApiError> {
        if depth > 16 {
            return Err(bad("the schema nests deeper than 16 levels"));
        }
        let obj = match s {
            Value::Bool(true) => return Ok("value".into()),
            Value::Object(o) => o,
            _ => return Err(bad("a schema must be an object")),
        };
        for k in obj.keys() {
            let known = matches!(
                k.as_str(),
                "type"
                    | "properties"
                    | "required"
                    | "items"
                    | "minItems"
                    | "maxItems"
                    | "enum"
                    | "const"
                    | "anyOf"
                    | "minLength"
                    | "maxLength"
            );
            if !known && !IGNORED.contains(&k.as_str()) {
                return Err(refuse(k));
            }
        }
        if let Some(c) = obj.get("const") {
            return Ok(literal(c));
        }
        if let Some(e) = obj.get("enum") {
            let items =
                e.as_array().filter(|a| !a.is_empty()).ok_or_else(|| bad("enum must be a non-empty list"))?;
            return Ok(format!("({})", items.iter().map(literal).collect::<Vec<_>>().join(" | ")));
        }
        if let Some(any) = obj.get("anyOf") {
            let alts = any
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| bad("anyOf must be a non-empty list"))?;
            let mut names = Vec::new();
            for a in alts {
                let body = self.schema(a, depth + 1)?;
                names.push(self.rule(body));
            }
            return Ok(format!("({})", names.join(" | ")));
        }
        let types: Vec<&str> = match obj.get("type") {
            None => return Ok("value".into()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts
                .iter()
                .map(|t| t.as_str().ok_or_else(|| bad("type must be a string or a list of strings")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("type must be a string or a list of strings")),
        };
        let mut alts = Vec::new();
        for t in types {
            alts.push(match t {
                "object" => self.object(obj, depth)?,
                "array" => self.array(obj, depth)?,
                "string" => self.string(obj)?,
                "number" => "number".to_string(),
                "integer" => "integer ws".to_string(),
                "boolean" => r#"("true" | "false") ws"#.to_string(),
                "null" => r#""null" ws"#.to_string(),
                other => return Err(bad(format!("unknown type {other:?}"))),
            });
        }
        Ok(if alts.len() == 1 { alts.remove(0) } else { format!("({})", alts.join(" | ")) })
    }

    fn object(&mut self, obj: &serde_json::Map<String, Value>, depth: usize) -> Result<String, ApiError> {
        let Some(props) = obj.get("properties") else {
            return Ok("object".into());
        };
        let props = props.as_object().ok_or_else(|| bad("properties must be an object"))?;
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(r) => r
                .as_array()
                .ok_or_else(|| bad("required must be a list"))?
                .iter()
                .map(|v| v.as_str().ok_or_else(|| bad("required must list property names")))
                .collect::<Result<_, _>>()?,
        };
        if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
            return Err(bad(format!("required names {missing:?}, which is not among the properties")));
        }
        let kv = |this: &mut Self, name: &str, schema: &Value| -> Result<String, ApiError> {
            let value = this.schema(schema, depth + 1)?;
            Ok(this.rule(format!("{} \":\" ws {value}", literal(&Value::String(name.to_string())))))
        };
        let mut req_rules = Vec::new();
        let mut opt_rules = Vec::new();
        for (name, schema) in props {
            if required.contains(&name.as_str()) {
                req_rules.push(kv(self, name, schema)?);
            } else {
                opt_rules.push(kv(self, name, schema)?);
            }
        }
        let body = if !req_rules.is_empty() {
            let mut b = req_rules.join(r#" "," ws "#);
            for o in &opt_rules {
                b.push_str(&format!(r#" ("," ws {o})?"#));
            }
            b
        } else if opt_rules.is_empty() {
            String::new()
        } else {
            // no property is required: any of them may come first, the later ones optional
            let starts: Vec<String> = (0..opt_rules.len())
                .map(|i| {
                    let mut b = opt_rules[i].clone();
                    for o in &opt_rules[i + 1..] {
                        b.push_str(&format!(r#" ("," ws {o})?"#));
                    }
                    b
                })
                .collect();
            format!("({})?", starts.join(" | "))
        };
        Ok(format!(r#""{{" ws {body} "}}" ws"#))
    }

    fn array(&mut self, obj: &serde_json::Map<String, Value>, depth: usize) -> Result<String, ApiError> {
        let item = match obj.get("items") {
            Some(i) => {
                let body = self.schema(i, depth + 1)?;
                self.rule(body)
            }
            None => "value".into(),
        };
        let bound = |k: &str| {
            obj.get(k)
                .map(|v| v.as_u64().ok_or_else(|| bad(format!("{k} must be a whole number"))))
                .transpose()
        };
        let (min, max) = (bound("minItems")?.unwrap_or(0), bound("maxItems")?);
        if max.is_some_and(|m| m < min) || min > 64 || max.is_some_and(|m| m > 256) {
            return Err(bad("minItems/maxItems out of range (at most 64 and 256)"));
        }
        let more = match max {
            Some(m) => format!(r#"("," ws {item}){{{},{}}}"#, min.saturating_sub(1), m.saturating_sub(1)),
            None => format!(r#"("," ws {item}){{{},}}"#, min.saturating_sub(1)),
        };
        let body = format!("{item} {more}");
        Ok(if min == 0 { format!(r#""[" ws ({body})? "]" ws"#) } else { format!(r#""[" ws {body} "]" ws"#) })
    }

    fn string(&mut self, obj: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
        let bound = |k: &str| {
            obj.get(k)
                .map(|v| v.as_u64().ok_or_else(|| bad(format!("{k} must be a whole number"))))
                .transpose()
        };
        match (bound("minLength")?, bound("maxLength")?) {
            (None, None) => Ok("string".into()),
            (min, max) => {
                let min = min.unwrap_or(0);
                if max.is_some_and(|m| m < min || m > 4096) || min > 4096 {
                    return Err(bad("minLength/maxLength out of range (at most 4096)"));
                }
                let rep = match max {
                    Some(m) => format!("{{{min},{m}}}"),
                    None => format!("{{{min},}}"),
                };
                Ok(format!(r#""\"" char{rep} "\"" ws"#))
            }
        }
    }
}

/// The grammar for a request's `response_format`, if it asks for JSON; `None` for text.
pub fn from_response_format(rf: &Value) -> Result<Option<String>, ApiError> {
    let kind = rf.get("type").and_then(Value::as_str).ok_or_else(|| bad("response_format needs a type"))?;
    let root = match kind {
        "text" => return Ok(None),
        "json_object" => "object".to_string(),
        "json_schema" => {
            let spec = rf.get("json_schema").ok_or_else(|| bad("json_schema needs a json_schema object"))?;
            let schema = spec.get("schema").ok_or_else(|| bad("json_schema needs a schema"))?;
            let mut b = Builder { rules: Vec::new() };
            let top = b.schema(schema, 0)?;
            let mut g = format!("root ::= ws {top}\n");
            for r in b.rules {
                g.push_str(&r);
                g.push('\n');
            }
            g.push_str(BASE);
            g.push('\n');
            g.push_str(WS);
            return Ok(Some(g));
        }
        other => {
            return Err(bad(format!(
                "response_format type {other:?} is not one of text, json_object, json_schema"
            )));
        }
    };
    Ok(Some(format!("root ::= ws {root}\n{BASE}\n{WS}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_become_grammars_and_unenforceable_keywords_are_named() {
        let g = from_response_format(&json!({"type": "json_object"})).ok().flatten().unwrap_or_default();
        assert!(g.starts_with("root ::= ws object") && g.contains("ws ::="), "{g}");
        assert_eq!(from_response_format(&json!({"type": "text"})).ok(), Some(None));
        let schema = json!({"type": "json_schema", "json_schema": {"name": "city", "strict": true, "schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "population": {"type": "integer"},
                           "tags": {"type": "array", "items": {"enum": ["big", "small"]}, "maxItems": 3}},
            "required": ["city", "population"], "additionalProperties": false}}});
        let g = from_response_format(&schema).ok().flatten().unwrap_or_default();
        assert!(g.contains(r#""\"city\"""#) && g.contains(r#"("," ws r"#), "{g}");
        for (kw, s) in [
            ("pattern", json!({"type": "string", "pattern": "^a"})),
            ("minimum", json!({"type": "integer", "minimum": 3})),
            ("$ref", json!({"$ref": "#/defs/x"})),
            ("oneOf", json!({"oneOf": [{"type": "string"}]})),
        ] {
            let e = from_response_format(&json!({"type": "json_schema", "json_schema": {"schema": s}})).err();
            let e = e.map(|e| (e.status.as_u16(), e.code, e.message)).unwrap_or_default();
            assert_eq!((e.0, e.1), (400, "unsupported_schema"));
            assert!(e.2.contains(kw), "{kw}: {}", e.2);
        }
        assert!(from_response_format(&json!({"type": "yaml"})).is_err());
    }
}
