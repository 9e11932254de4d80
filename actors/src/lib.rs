//! Reusable actor-model supervision on actix. Filled in by its own issue.
