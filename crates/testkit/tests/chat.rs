//! The chat templates must render under minijinja exactly as transformers rendered them.

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use quiver_testkit::{build_tokenizer, golden_specs, load_golden, TokenizerFlavor};
use quiver_testkit::{CHATML_CHAT_TEMPLATE, LLAMA_CHAT_TEMPLATE};

fn render(flavor: TokenizerFlavor, messages: &serde_json::Value) -> Result<String> {
    let mut env = Environment::new();
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    let (template, bos) = match flavor {
        TokenizerFlavor::Llama => (LLAMA_CHAT_TEMPLATE, "<|begin_of_text|>"),
        TokenizerFlavor::ChatMl => (CHATML_CHAT_TEMPLATE, ""),
    };
    env.add_template("chat", template)?;
    let ctx = context! { messages => messages, add_generation_prompt => true, bos_token => bos };
    Ok(env.get_template("chat")?.render(ctx)?)
}

#[test]
fn minijinja_renders_golden_chats() -> Result<()> {
    for spec in golden_specs() {
        let golden = load_golden(&spec.name)?;
        let tok = build_tokenizer(spec.tokenizer)?;
        for chat in &golden.chat {
            let text = render(spec.tokenizer, &serde_json::to_value(&chat.messages)?)?;
            let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow!("{e}"))?;
            assert_eq!(enc.get_ids(), chat.ids.as_slice(), "{}: {text:?}", spec.name);
        }
    }
    Ok(())
}

#[test]
fn unknown_role_raises() {
    let msgs = serde_json::json!([{"role": "tool", "content": "x"}]);
    for flavor in [TokenizerFlavor::Llama, TokenizerFlavor::ChatMl] {
        let err = render(flavor, &msgs).err().map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("Unknown role")), "{flavor:?}");
    }
}
