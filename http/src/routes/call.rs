//! What the route table and the handlers share: the call a handler is given, a handler's
//! signature, and `tri!` for ending a handler with a reply. A leaf, so that the table can name
//! the handlers and the handlers can use these without importing each other.

use std::sync::Arc;

use atelier_storage::StorageError;

use crate::auth::Identity;
use crate::reply::Reply;
use crate::request::Req;
use crate::state::Shared;

/// Ends a handler with the reply carried by an `Err` (an input or access check that failed),
/// keeping `?` for storage failures.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        }
    };
}
pub(crate) use tri;

/// What a handler is given: the request, its path's `{...}` parameters in order, the caller
/// (always there on `User` and `Admin` routes, but for `/metrics` made public) and the server.
pub(crate) struct Call<'a> {
    pub req: &'a Req,
    pub params: &'a [&'a str],
    pub who: Option<&'a Identity>,
    pub shared: &'a Arc<Shared>,
}

impl Call<'_> {
    /// The caller of a route that needs a token.
    pub fn me(&self) -> &Identity {
        self.who.expect("invariant: authenticated routes have an identity")
    }
}

/// A route's handler. `Err` is a storage failure (503); every other outcome is a reply.
pub(crate) type Handler = fn(&Call<'_>) -> Result<Reply, StorageError>;
