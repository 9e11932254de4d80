//! Event traits: what can travel on the [`EventBus`](crate::EventBus) and how
//! an event type mutates the bus-owned projection state.

use std::any::Any;

/// A value that can be published on the bus.
///
/// One Rust type per event kind: subscribers register for a *type* and
/// receive only values of that type (routing is keyed by [`std::any::TypeId`]).
/// The trait is object safe so the bus can carry events type-erased
/// (`Arc<dyn Event>`) and an audit-log subscriber can see every event via
/// [`EventBus::subscribe_all`](crate::EventBus::subscribe_all).
pub trait Event: Any + Send + Sync + 'static {
    /// Stable, human-readable event name (used by the audit view and stats).
    /// Defaults to the Rust type name.
    fn name(&self) -> &'static str {
        std::any::type_name::<Self>()
    }

    /// JSON rendering for type-erased consumers (audit log). Defaults to
    /// `null`; event types that derive `Serialize` typically return
    /// `serde_json::to_value(self).unwrap_or_default()`.
    fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

impl dyn Event {
    /// Downcast a type-erased event reference.
    pub fn downcast_ref<E: Event>(&self) -> Option<&E> {
        (self as &dyn Any).downcast_ref::<E>()
    }

    /// Whether the erased event is of type `E`.
    pub fn is<E: Event>(&self) -> bool {
        (self as &dyn Any).is::<E>()
    }
}

/// Projection hook: an event type that implements `Apply<S>` mutates the
/// state `S` owned by the bus. The bus applies events in publish order, on
/// its own actor, before fanning the event out; register the type with
/// [`EventBusBuilder::project`](crate::EventBusBuilder::project).
///
/// A panic inside `apply` is caught and counted (see
/// [`BusStats::panics`](crate::BusStats)); the state keeps whatever partial
/// mutation happened before the panic, so keep `apply` simple.
pub trait Apply<S>: Event {
    /// Mutate `state` to reflect this event.
    fn apply(&self, state: &mut S);
}
