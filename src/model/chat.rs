//! Chat templates: the Jinja source shipped with the model, rendered by minijinja.

use std::sync::atomic::{AtomicUsize, Ordering};

use minijinja::value::{Object, Value, ValueKind};
use minijinja::{context, Environment, Output, State};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user".into(), content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage { role: "assistant".into(), content: content.into() }
    }
}

/// The work one render may do, in minijinja instructions: a conversation of many thousands
/// of messages takes far less, and a template from a model file that loops forever stops.
const FUEL: u64 = 20_000_000;
/// The longest a rendered conversation may be; a template that writes more is refused.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles the template; an invalid one is refused here, not at the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_formatter(bounded_formatter);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| format!("invalid chat template: {e}"))?;
        Ok(ChatTemplate { env, bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Renders the conversation, ending with the assistant's turn opened when
    /// `add_generation_prompt` is set. Bounded in work (`FUEL`) and output
    /// (`MAX_RENDERED_BYTES`), whatever the template does.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let mut out = Capped { bytes: vec![], cap: MAX_RENDERED_BYTES };
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| "chat template wrote invalid UTF-8".into()),
            Err(_) if out.bytes.len() >= out.cap => {
                Err(format!("chat template output is longer than {MAX_RENDERED_BYTES} bytes"))
            }
            Err(e) => Err(format!("chat template failed: {e}")),
        }
    }
}

/// Bytes a render has written so far (in macros and `{% set %}` blocks too).
#[derive(Debug, Default)]
struct Written(AtomicUsize);

impl Object for Written {}

/// Checks each value a template writes against what is left of the render's output budget
/// before formatting it, wherever it is written: a macro's or a `{% set %}` block's output
/// is captured inside minijinja, where the writer's cap cannot see it, and a sequence
/// repeated a million times (`messages * 1000000`) would be rendered whole first.
fn bounded_formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), minijinja::Error> {
    let written = state.get_or_set_temp_object("specula_written", Written::default);
    let left = MAX_RENDERED_BYTES.saturating_sub(written.0.load(Ordering::Relaxed));
    let Some(size) = rendered_size(value, left, 0) else {
        let msg = format!(
            "the template writes more than {MAX_RENDERED_BYTES} bytes, or a value nested more than {MAX_DEPTH} deep (a namespace holding itself, say)"
        );
        return Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg));
    };
    written.0.fetch_add(size, Ordering::Relaxed);
    minijinja::escape_formatter(out, state, value)
}

/// Deepest nesting of sequences and maps a template may write: minijinja formats values
/// recursively, and a namespace that holds itself (`{% set ns.a = ns %}`) would recurse
/// until the stack overflows.
const MAX_DEPTH: usize = 64;

/// At most the bytes `value` renders to, or None past `limit` or `MAX_DEPTH`; found without
/// rendering it, and without looking at more than `limit` elements. Strings inside
/// sequences and maps are shown quoted and escaped (up to 6 bytes per byte).
fn rendered_size(value: &Value, limit: usize, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    let size = match value.kind() {
        ValueKind::String | ValueKind::Bytes => {
            let len = value.as_str().map_or_else(|| value.as_bytes().map_or(0, <[u8]>::len), str::len);
            if depth > 0 {
                2 + 6 * len
            } else {
                len
            }
        }
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
            let mut total = 2;
            for item in value.try_iter().ok()? {
                let entry = match value.kind() {
                    ValueKind::Map => value.get_item(&item).unwrap_or_default(),
                    _ => Value::UNDEFINED,
                };
                total += 4 + rendered_size(&item, limit.checked_sub(total)?, depth + 1)?;
                total += rendered_size(&entry, limit.checked_sub(total)?, depth + 1)?;
            }
            total
        }
        _ => 32, // numbers, booleans, none, functions and plain objects by name
    };
    (size <= limit).then_some(size)
}

/// A writer that refuses to grow past `cap` bytes.
struct Capped {
    bytes: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            self.bytes.extend_from_slice(&buf[..self.cap - self.bytes.len()]);
            return Err(std::io::Error::other("output too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_chatml_with_default_system_prompt() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_template_that_loops_forever_or_writes_too_much_stops() {
        let forever = "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}.{% endfor %}{% endfor %}{% endfor %}";
        let err = ChatTemplate::new(forever, "", "").unwrap().render(&[], true).unwrap_err();
        assert!(err.contains("fuel"), "{err}");
        let huge = "{% for i in range(10000) %}{{ 'x' * 10000 }}{% endfor %}";
        let err = ChatTemplate::new(huge, "", "").unwrap().render(&[], true).unwrap_err();
        assert!(err.contains("longer than") || err.contains("more than"), "{err}");
        // Written inside a macro, whose output minijinja captures before it reaches us.
        let repeated = "{% macro m() %}{{ messages * 100000000 }}{% endmacro %}{{ m() }}";
        let err = ChatTemplate::new(repeated, "", "").unwrap().render(&[ChatMessage::user("Hi")], true).unwrap_err();
        assert!(err.contains("more than"), "{err}");
        // A namespace that holds itself: formatting it would recurse until the stack overflows.
        let cyclic = "{% set ns = namespace(a=1) %}{% set ns.a = ns %}{{ ns.a }}";
        let err = ChatTemplate::new(cyclic, "", "").unwrap().render(&[], true).unwrap_err();
        assert!(err.contains("nested more than"), "{err}");
    }

    #[test]
    fn invalid_template_is_refused_at_load() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
