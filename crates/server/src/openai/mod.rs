//! OpenAI's API objects as serde types: request bodies (with the vLLM extensions Quiver
//! implements) and every response object. Nothing is built as untyped JSON.

pub mod limits;
pub mod messages;
pub mod request;
pub mod response;
