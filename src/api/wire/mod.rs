//! The API's wire types: every request body and query the handlers read, every answer
//! they write, with the serde and OpenAPI derives; each answer is made `From` the
//! domain's value, which knows nothing of HTTP. One file per resource, `names.rs` the
//! domain's enums as the wire spells them, `sorted.rs` how the answers that always had
//! sorted keys keep them.

pub mod console;
pub mod images;
pub mod names;
pub mod node;
pub mod ports;
pub mod sorted;
pub mod vms;
