//! Warning Events on rejected Services (API mode), so `kubectl describe service` shows why lb
//! does not serve a Service or part of it, as kube-proxy reports problems it finds.
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};

use crate::agent::Rejection;

/// Publishes Events as the `lb` controller of this node.
pub struct ServiceEvents {
    recorder: Recorder,
}

impl ServiceEvents {
    pub fn new(client: Client, node_name: &str) -> Self {
        let reporter = Reporter { controller: "lb".into(), instance: Some(format!("lb-{node_name}")) };
        Self { recorder: Recorder::new(client, reporter) }
    }

    /// Best effort: a failure is logged, never retried (the rejection is in the log anyway).
    pub async fn warn(&self, r: &Rejection) {
        let (namespace, name) = r.service.split_once('/').unwrap_or(("default", &r.service));
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            ..Default::default()
        };
        // Events are limited to 1 kB of note.
        let note: String = r.message.chars().take(1000).collect();
        let event = Event {
            type_: EventType::Warning,
            reason: r.reason.into(),
            note: Some(note),
            action: "Programming".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::debug!(service = %r.service, error = %e, "cannot publish the Event");
        }
    }
}
