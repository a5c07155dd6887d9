//! Structured output: which grammar a request constrains its output to.
//!
//! OpenAI's `response_format` (`text`, `json_object`, `json_schema`), and
//! the extensions other servers offer, under their names: vLLM's
//! `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and
//! `structured_outputs` (`json`, `regex`, `choice`, `grammar`), and
//! llama-server's `json_schema`. Grammars are in llguidance's Lark syntax.
//! At most one may be given: two constraints on one output have no
//! meaning a client could rely on.

use serde_json::Value;
use strata_model::GrammarSpec;

use crate::error::ApiError;

/// The most strings in a choice list.
pub(crate) const MAX_CHOICES: usize = 1024;

/// The structured-output parameters, as given.
#[derive(Debug, Clone, Default)]
pub(crate) struct Structured {
    pub(crate) response_format: Option<Value>,
    pub(crate) guided_json: Option<Value>,
    pub(crate) guided_regex: Option<String>,
    pub(crate) guided_choice: Option<Vec<String>>,
    pub(crate) guided_grammar: Option<String>,
    pub(crate) structured_outputs: Option<Value>,
    pub(crate) json_schema: Option<Value>,
}

/// A grammar and the parameter that asked for it (errors name it).
pub(crate) type Wanted = (GrammarSpec, &'static str);

fn invalid(param: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

/// A schema given as an object or as its JSON text (vLLM takes both).
fn schema(param: &'static str, v: &Value) -> Result<GrammarSpec, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(true) => Ok(GrammarSpec::JsonSchema(v.clone())),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Ok(GrammarSpec::JsonSchema(v)),
            Ok(_) => Err(invalid(
                param,
                format!("{param} must be a JSON schema object"),
            )),
            Err(e) => Err(invalid(param, format!("{param} is not valid JSON: {e}"))),
        },
        _ => Err(invalid(
            param,
            format!("{param} must be a JSON schema object"),
        )),
    }
}

fn choice(param: &'static str, c: &[String]) -> Result<GrammarSpec, ApiError> {
    if c.is_empty() {
        return Err(invalid(param, format!("{param} must not be empty")));
    }
    if c.len() > MAX_CHOICES {
        return Err(invalid(
            param,
            format!(
                "{param} holds at most {MAX_CHOICES} strings, got {}",
                c.len()
            ),
        ));
    }
    Ok(GrammarSpec::Choice(c.to_vec()))
}

/// `response_format`.
fn response_format(v: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    const P: &str = "response_format";
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| {
        invalid(
            P,
            "response_format must be an object with a \"type\": text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let js = v.get("json_schema").filter(|j| j.is_object()).ok_or_else(|| {
                invalid(P, "response_format of type json_schema needs a \"json_schema\" object with a \"schema\"")
            })?;
            if let Some(s) = js.get("strict")
                && !s.is_boolean()
                && !s.is_null()
            {
                return Err(invalid(
                    P,
                    "response_format.json_schema.strict must be a boolean",
                ));
            }
            // Strict or not, the output follows the schema: a schema as a
            // hint only would be a parameter silently weakened.
            match js.get("schema") {
                Some(s) if !s.is_null() => schema(P, s).map(Some),
                _ => Err(invalid(P, "response_format.json_schema needs a \"schema\"")),
            }
        }
        other => Err(invalid(
            P,
            format!(
                "response_format type {other:?} is not supported: text, json_object or json_schema"
            ),
        )),
    }
}

/// vLLM's `structured_outputs` object: one of `json`, `regex`, `choice`,
/// `grammar`.
fn structured_outputs(v: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    const P: &str = "structured_outputs";
    let Some(o) = v.as_object() else {
        return Err(invalid(P, "structured_outputs must be an object"));
    };
    let mut found = Vec::new();
    for (k, x) in o {
        if x.is_null() {
            continue;
        }
        let spec = match k.as_str() {
            "json" => schema(P, x)?,
            "regex" => GrammarSpec::Regex(
                x.as_str()
                    .ok_or_else(|| invalid(P, "structured_outputs.regex must be a string"))?
                    .to_string(),
            ),
            "grammar" => GrammarSpec::Lark(
                x.as_str()
                    .ok_or_else(|| invalid(P, "structured_outputs.grammar must be a string"))?
                    .to_string(),
            ),
            "choice" => {
                let c: Vec<String> = serde_json::from_value(x.clone()).map_err(|_| {
                    invalid(P, "structured_outputs.choice must be a list of strings")
                })?;
                choice(P, &c)?
            }
            "json_object" if x == &Value::Bool(true) => GrammarSpec::JsonObject,
            "json_object" if x == &Value::Bool(false) => continue,
            other => {
                return Err(invalid(
                    P,
                    format!(
                        "structured_outputs.{other} is not supported (json, regex, choice, grammar, json_object)"
                    ),
                ));
            }
        };
        found.push(spec);
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(invalid(
            P,
            "structured_outputs takes one of json, regex, choice, grammar",
        )),
    }
}

impl Structured {
    /// Reads one of its fields (see the `Fields` trait).
    pub(crate) fn read<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error> {
        Ok(super::de::read_fields!(
            self,
            key,
            map,
            [
                response_format,
                guided_json,
                guided_regex,
                guided_choice,
                guided_grammar,
                structured_outputs,
                json_schema,
            ]
        ))
    }

    /// The grammar asked for, if any; a 400 naming the parameter if one is
    /// malformed or several are given.
    pub(crate) fn wanted(&self) -> Result<Option<Wanted>, ApiError> {
        let mut all: Vec<Wanted> = Vec::new();
        if let Some(v) = &self.response_format
            && let Some(g) = response_format(v)?
        {
            all.push((g, "response_format"));
        }
        if let Some(v) = &self.guided_json {
            all.push((schema("guided_json", v)?, "guided_json"));
        }
        if let Some(r) = &self.guided_regex {
            all.push((GrammarSpec::Regex(r.clone()), "guided_regex"));
        }
        if let Some(c) = &self.guided_choice {
            all.push((choice("guided_choice", c)?, "guided_choice"));
        }
        if let Some(g) = &self.guided_grammar {
            all.push((GrammarSpec::Lark(g.clone()), "guided_grammar"));
        }
        if let Some(v) = &self.structured_outputs
            && let Some(g) = structured_outputs(v)?
        {
            all.push((g, "structured_outputs"));
        }
        if let Some(v) = &self.json_schema {
            all.push((schema("json_schema", v)?, "json_schema"));
        }
        match all.len() {
            0 | 1 => Ok(all.pop()),
            _ => Err(invalid(
                all[1].1,
                format!(
                    "{} and {} both constrain the output: give one",
                    all[0].1, all[1].1
                ),
            )),
        }
    }
}
