//! Tool calls, the request's side: `tools`, `tool_choice` and
//! `parallel_tool_calls` checked, the formats models write calls in, and
//! the grammar that makes `required` or a named function a valid call.

use serde::Deserialize;
use serde_json::{Value, json};
use strata_model::GrammarSpec;

pub(crate) use crate::cli::ToolFormat;
use crate::error::ApiError;

/// The most tools a request may define.
pub(crate) const MAX_TOOLS: usize = 128;

/// One entry of `tools`.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Tool {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionDef>,
}

/// A function a tool names.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct FunctionDef {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) description: Option<String>,
    /// Its arguments' JSON schema (none: no arguments).
    #[serde(default)]
    pub(crate) parameters: Option<Value>,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The model decides (text or calls).
    Auto,
    /// At least one call, of any function.
    Required,
    /// A call of this function.
    Named(String),
}

impl ToolFormat {
    /// The format a chat template teaches, by the markers it holds;
    /// Hermes for a template that knows no tools (Strata describes them
    /// in that format).
    pub(crate) fn of_template(source: &str) -> Self {
        if source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if source.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }

    /// The key of a call's arguments in this format.
    pub(crate) fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        }
    }
}

/// The tools of a request that may call them.
#[derive(Debug, Clone)]
pub(crate) struct ToolSet {
    pub(crate) functions: Vec<FunctionDef>,
    pub(crate) choice: Choice,
    /// More than one call per answer.
    pub(crate) parallel: bool,
}

fn invalid(param: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(param, msg)
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolSet {
    /// Checks `tools`, `tool_choice` and `parallel_tool_calls`; `None`
    /// when no tool may be called (none given, or `tool_choice: "none"`:
    /// then the tools are not shown to the model either, so it cannot
    /// call one).
    pub(crate) fn from_request(
        tools: Option<&[Tool]>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<ToolSet>, ApiError> {
        let mut functions: Vec<FunctionDef> = Vec::new();
        for t in tools.unwrap_or_default() {
            if t.kind != "function" {
                return Err(invalid(
                    "tools",
                    format!(
                        "tools of type {:?} are not supported (only \"function\")",
                        t.kind
                    ),
                ));
            }
            let f = t
                .function
                .clone()
                .ok_or_else(|| invalid("tools", "a tool of type function needs a \"function\""))?;
            if !valid_name(&f.name) {
                return Err(invalid(
                    "tools",
                    format!(
                        "function names are 1 to 64 letters, digits, '_' or '-', got {:?}",
                        f.name
                    ),
                ));
            }
            if functions.iter().any(|g| g.name == f.name) {
                return Err(invalid(
                    "tools",
                    format!("function {:?} is defined twice", f.name),
                ));
            }
            if let Some(p) = &f.parameters
                && !p.is_object()
            {
                return Err(invalid(
                    "tools",
                    format!(
                        "the parameters of {:?} must be a JSON schema object",
                        f.name
                    ),
                ));
            }
            functions.push(f);
        }
        let choice = match choice {
            None | Some(Value::Null) => {
                if functions.is_empty() {
                    return Ok(None);
                }
                Choice::Auto
            }
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" if functions.is_empty() => return Ok(None),
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(invalid(
                        "tool_choice",
                        format!(
                            "tool_choice must be none, auto, required or a function, got {other:?}"
                        ),
                    ));
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        invalid(
                            "tool_choice",
                            "tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(invalid(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not among the tools"),
                    ));
                }
                Choice::Named(name.to_string())
            }
        };
        if functions.is_empty() {
            return Err(invalid("tool_choice", "tool_choice required needs tools"));
        }
        Ok(Some(ToolSet {
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// The tools as templates get them (OpenAI's shape, which Hugging
    /// Face templates expect).
    pub(crate) fn template_value(&self) -> Value {
        Value::Array(
            self.functions
                .iter()
                .map(|f| {
                    let mut func = json!({"name": f.name, "parameters": params(f)});
                    if let Some(d) = &f.description {
                        func["description"] = json!(d);
                    }
                    json!({"type": "function", "function": func})
                })
                .collect(),
        )
    }

    /// The system prompt that describes the tools, for a template that
    /// knows none (Hermes' format, which Qwen's templates also use).
    pub(crate) fn hermes_prompt(&self) -> String {
        let defs: Vec<String> = self
            .template_value()
            .as_array()
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect();
        let must = match &self.choice {
            Choice::Auto => String::new(),
            Choice::Required => "\nYou must call at least one function.".into(),
            Choice::Named(n) => format!("\nYou must call the function {n}."),
        };
        format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.{must}\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            defs.join("\n")
        )
    }

    /// Whether a function of this name is defined.
    pub(crate) fn defines(&self, name: &str) -> bool {
        self.functions.iter().any(|f| f.name == name)
    }

    /// With `required` or a named function: the grammar that makes the
    /// whole answer valid calls whose arguments follow their schemas.
    pub(crate) fn grammar(&self, format: ToolFormat) -> Option<GrammarSpec> {
        let chosen: Vec<&FunctionDef> = match &self.choice {
            Choice::Auto => return None,
            Choice::Required => self.functions.iter().collect(),
            Choice::Named(n) => self.functions.iter().filter(|f| f.name == *n).collect(),
        };
        let args = format.arguments_key();
        let one: Vec<Value> = chosen
            .iter()
            .map(|f| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, args: params(f)},
                    "required": ["name", args],
                    "additionalProperties": false,
                })
            })
            .collect();
        let compact =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let mut call = if one.len() == 1 {
            one[0].clone()
        } else {
            json!({"anyOf": one})
        };
        call["x-guidance"] = compact.clone();
        let lark = match format {
            ToolFormat::Hermes => {
                let more = if self.parallel {
                    " (\"\\n\" call)*"
                } else {
                    ""
                };
                format!(
                    "start: call{more}\ncall: \"<tool_call>\\n\" args \"\\n</tool_call>\"\nargs: %json {call}"
                )
            }
            ToolFormat::Llama3 => format!("start: args\nargs: %json {call}"),
            ToolFormat::Mistral => {
                let max = if self.parallel { Value::Null } else { json!(1) };
                let mut list =
                    json!({"type": "array", "items": call, "minItems": 1, "x-guidance": compact});
                if !max.is_null() {
                    list["maxItems"] = max;
                }
                // The `[TOOL_CALLS]` marker is a control token of the
                // model's own: the list alone is the call (it is read back
                // with or without the marker).
                format!("start: args\nargs: %json {list}")
            }
        };
        Some(GrammarSpec::Lark(lark))
    }
}

/// A function's parameters schema (no arguments: an empty object).
fn params(f: &FunctionDef) -> Value {
    f.parameters
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}))
}
