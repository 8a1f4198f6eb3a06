//! Errors a user can cause: a tree that cannot be built, a start that fails.

use std::fmt;
use std::sync::Arc;

use crate::report::ShutdownReport;

/// A boxed error, as returned by fallible factories.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a tree's specification was rejected by [`TreeBuilder::build`](crate::TreeBuilder::build).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// Two siblings share a name.
    DuplicateName {
        /// Path of the supervisor holding both (empty for the root).
        parent: String,
        /// The repeated name.
        name: String,
    },
    /// A name is empty or contains `/` (which separates path segments).
    InvalidName {
        /// Path of the supervisor holding the child.
        parent: String,
        /// The rejected name.
        name: String,
    },
    /// A dependency names no child.
    UnknownDependency {
        /// Path of the child that declared it.
        child: String,
        /// The name it gave.
        dependency: String,
    },
    /// Dependencies (together with the rule that a supervisor stops after its children) form a
    /// cycle, so no stop order exists. Lists the paths around the cycle, first repeated last.
    Cycle(Vec<String>),
    /// A shutdown budget, deadline or interval is zero.
    ZeroDuration {
        /// What has it: a child's path, or a tree setting's name.
        what: String,
    },
    /// A child is placed on a pool that was not declared with `TreeBuilder::pool`.
    UnknownPool {
        /// Path of the child.
        child: String,
        /// The pool name.
        pool: String,
    },
    /// A pool was declared with zero arbiters.
    EmptyPool(String),
    /// A supervisor's restart backoff has its minimum above its maximum.
    InvalidBackoff {
        /// Which supervisor: `the root` or its path in backquotes.
        supervisor: String,
        /// The minimum given.
        min: std::time::Duration,
        /// The maximum given.
        max: std::time::Duration,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::DuplicateName { parent, name } => {
                write!(f, "duplicate child name `{name}` under {}", display_parent(parent))
            }
            BuildError::InvalidName { parent, name } => write!(
                f,
                "invalid child name `{name}` under {}: names must be non-empty and contain no `/`",
                display_parent(parent)
            ),
            BuildError::UnknownDependency { child, dependency } => write!(
                f,
                "child `{child}` depends on `{dependency}`, which is neither a sibling nor a path from the root"
            ),
            BuildError::Cycle(path) => write!(f, "dependency cycle: {}", path.join(" -> ")),
            BuildError::ZeroDuration { what } => write!(f, "{what}: a zero duration is not allowed"),
            BuildError::UnknownPool { child, pool } => write!(
                f,
                "child `{child}` is placed on pool `{pool}`, which is not declared (TreeBuilder::pool)"
            ),
            BuildError::EmptyPool(pool) => write!(f, "pool `{pool}` has zero arbiters"),
            BuildError::InvalidBackoff { supervisor, min, max } => write!(
                f,
                "restart backoff of {supervisor}: minimum {min:?} is above maximum {max:?}"
            ),
        }
    }
}

fn display_parent(parent: &str) -> String {
    if parent.is_empty() {
        "the root".to_owned()
    } else {
        format!("`{parent}`")
    }
}

impl std::error::Error for BuildError {}

/// Why a tree failed to start. The children already started were shut down, in reverse start
/// order; `report` tells how that went.
#[derive(Debug)]
pub struct StartError {
    /// Path of the child whose start failed.
    pub child: String,
    /// What went wrong (the factory's error, or the panic message).
    pub cause: String,
    /// The shutdown of what had started.
    pub report: Arc<ShutdownReport>,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "child `{}` failed to start: {}", self.child, self.cause)
    }
}

impl std::error::Error for StartError {}
