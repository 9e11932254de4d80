//! Generated protobuf and gRPC code for the three wire packages.
//!
//! Field numbers and names are fixed by clawker v0.8.0 (see `proto/`); the
//! tests below decode hand-built bytes to prove it.

#![allow(clippy::all, missing_docs)]

pub mod clawkerd {
    pub mod v1 {
        tonic::include_proto!("clawker.clawkerd.v1");
    }
}

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("clawker.agent.v1");
    }
}

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("clawker.admin.v1");
    }
}

/// Encoded `FileDescriptorSet` of every proto, for server reflection and for
/// the "every RPC has a policy" tests that walk service descriptors.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("clawker_descriptor");

#[cfg(test)]
mod tests {
    use super::clawkerd::v1::{self as pb, command, response};
    use prost::Message;

    /// Bytes built by hand from the v0.8.0 field numbers, not by prost.
    #[test]
    fn command_field_numbers_match_the_reference() {
        let stage: Vec<u8> = [
            &[0x0a, 0x02, b's', b'h'][..],                     // argv = 1
            &[0x10, 0xe9, 0x07],                               // uid = 2 (1001)
            &[0x18, 0xe9, 0x07],                               // gid = 3 (1001)
            &[0x2a, 0x06, 0x0a, 0x01, b'K', 0x12, 0x01, b'V'], // env = 5
        ]
        .concat();
        let mut shell = vec![0x0a, stage.len() as u8]; // stages = 1
        shell.extend(&stage);
        shell.extend([0x10, 0x1e]); // timeout_seconds = 2 (30)
        let mut bytes = vec![0x0a, 0x02, b'c', b'1']; // command_id = 1
        bytes.extend([0x1a, shell.len() as u8]); // shell = 3
        bytes.extend(&shell);

        let cmd = pb::Command::decode(bytes.as_slice()).expect("decode");
        assert_eq!(cmd.command_id, "c1");
        let Some(command::Payload::Shell(shell)) = cmd.payload else {
            panic!("expected shell payload, got {:?}", cmd.payload);
        };
        assert_eq!(shell.timeout_seconds, 30);
        assert_eq!(shell.stages.len(), 1);
        let st = &shell.stages[0];
        assert_eq!(st.argv, vec!["sh"]);
        assert_eq!((st.uid, st.gid), (1001, 1001));
        assert_eq!(st.env.get("K").map(String::as_str), Some("V"));
        assert_eq!(pb::Command::encode_to_vec(&cmd_from(&bytes)), bytes);
    }

    fn cmd_from(bytes: &[u8]) -> pb::Command {
        pb::Command::decode(bytes).expect("decode")
    }

    #[test]
    fn response_field_numbers_match_the_reference() {
        let bytes = [
            0x0a, 0x02, b'c', b'1', // command_id = 1
            0x2a, 0x08, // stderr = 5
            0x08, 0x02, // stage_index = 1
            0x12, 0x04, b'o', b'o', b'p', b's', // data = 2
        ];
        let resp = pb::Response::decode(&bytes[..]).expect("decode");
        assert_eq!(resp.command_id, "c1");
        let Some(response::Payload::Stderr(chunk)) = resp.payload else {
            panic!("expected stderr payload");
        };
        assert_eq!(chunk.stage_index, 2);
        assert_eq!(chunk.data, &b"oops"[..]);
    }

    #[test]
    fn other_oneof_tags_match_the_reference() {
        // Response.error = 8 {code = 1: TIMEOUT(4), message = 2}
        let bytes = [0x42, 0x05, 0x08, 0x04, 0x12, 0x01, b'x'];
        let resp = pb::Response::decode(&bytes[..]).unwrap();
        let Some(response::Payload::Error(e)) = resp.payload else {
            panic!("expected error payload");
        };
        assert_eq!(e.code(), pb::ErrorCode::Timeout);
        assert_eq!(pb::ErrorCode::Timeout.as_str_name(), "ERROR_CODE_TIMEOUT");
        // Command.agent_ready = 8, register_required = 7, signal = 6 {signo = 1}
        let c = pb::Command::decode(&[0x42, 0x00][..]).unwrap();
        assert!(matches!(c.payload, Some(command::Payload::AgentReady(_))));
        let c = pb::Command::decode(&[0x3a, 0x00][..]).unwrap();
        assert!(matches!(
            c.payload,
            Some(command::Payload::RegisterRequired(_))
        ));
        let c = pb::Command::decode(&[0x32, 0x02, 0x08, 0x0f][..]).unwrap();
        assert!(matches!(
            c.payload,
            Some(command::Payload::Signal(pb::Signal { signo: 15 }))
        ));
        // Response.register_done = 9 {ok = 1, error = 2}
        let r = pb::Response::decode(&[0x4a, 0x02, 0x08, 0x01][..]).unwrap();
        assert!(matches!(
            r.payload,
            Some(response::Payload::RegisterDone(pb::RegisterDone {
                ok: true,
                ..
            }))
        ));
        // Agent: RegisterRequest{agent_name = 1, project = 2}
        let req =
            super::agent::v1::RegisterRequest::decode(&[0x0a, 0x01, b'a', 0x12, 0x01, b'p'][..])
                .unwrap();
        assert_eq!((req.agent_name.as_str(), req.project.as_str()), ("a", "p"));
    }

    #[test]
    fn garbage_bytes_are_a_decode_error_not_a_panic() {
        for bytes in [
            &[0xff][..],
            &[0x0a, 0x10, 0x01][..],
            &[0x1a, 0x03, 0x0a, 0xff, 0xff][..],
        ] {
            assert!(pb::Command::decode(bytes).is_err());
        }
    }
}
