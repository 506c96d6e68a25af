use super::*;

/// Builds pgoutput messages byte by byte, as the server lays them out.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn cstr(mut self, v: &str) -> Self {
        self.0.extend_from_slice(v.as_bytes());
        self.0.push(0);
        self
    }
    fn text(self, v: &str) -> Self {
        let mut this = self.u8(b't').i32(v.len() as i32);
        this.0.extend_from_slice(v.as_bytes());
        this
    }
}

#[test]
fn begin_and_commit() {
    let begin = Bytes::default().u8(b'B').u64(0x16B3748).u64(42).i32(777).0;
    assert_eq!(
        decode(&begin).unwrap(),
        Message::Begin(Begin {
            final_lsn: Lsn(0x16B3748),
            commit_time_micros: 42,
            xid: 777
        })
    );
    let commit = Bytes::default().u8(b'C').u8(0).u64(10).u64(20).u64(30).0;
    assert_eq!(
        decode(&commit).unwrap(),
        Message::Commit(Commit {
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time_micros: 30
        })
    );
}

#[test]
fn relation_with_key_flags() {
    let bytes = Bytes::default()
        .u8(b'R')
        .i32(16384)
        .cstr("public")
        .cstr("tb_order")
        .u8(b'd')
        .i16(2)
        .u8(1)
        .cstr("id")
        .i32(23)
        .i32(-1)
        .u8(0)
        .cstr("total")
        .i32(1700)
        .i32(655366)
        .0;
    let Message::Relation(relation) = decode(&bytes).unwrap() else {
        panic!("not a relation")
    };
    assert_eq!(relation.name, "tb_order");
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);
    assert!(relation.columns[0].is_key);
    assert!(!relation.columns[1].is_key);
    assert_eq!(relation.columns[1].type_oid, 1700);
}

#[test]
fn update_with_old_key_and_unchanged_toast() {
    let bytes = Bytes::default()
        .u8(b'U')
        .i32(16384)
        .u8(b'K')
        .i16(2)
        .text("1")
        .u8(b'n')
        .u8(b'N')
        .i16(2)
        .text("2")
        .u8(b'u')
        .0;
    let Message::Update(update) = decode(&bytes).unwrap() else {
        panic!("not an update")
    };
    let (kind, old) = update.old.unwrap();
    assert_eq!(kind, OldKind::Key);
    assert_eq!(old.get(0), Some(ColumnValue::Text(b"1")));
    assert_eq!(
        update.new.iter().collect::<Vec<_>>(),
        vec![ColumnValue::Text(b"2"), ColumnValue::UnchangedToast]
    );
}

#[test]
fn truncate_options() {
    let bytes = Bytes::default().u8(b'T').i32(2).u8(3).i32(1).i32(2).0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::Truncate(Truncate {
            cascade: true,
            restart_identity: true,
            relation_oids: vec![1, 2]
        })
    );
}

#[test]
fn logical_message() {
    let bytes = Bytes::default()
        .u8(b'M')
        .u8(1)
        .u64(99)
        .cstr("outbox")
        .i32(2)
        .u8(b'h')
        .u8(b'i')
        .0;
    assert_eq!(
        decode(&bytes).unwrap(),
        Message::LogicalMessage(LogicalMessage {
            transactional: true,
            lsn: Lsn(99),
            prefix: "outbox",
            content: b"hi"
        })
    );
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty"),
        (vec![b'Z'], "unknown pgoutput message tag 'Z'"),
        (vec![b'B', 0, 0], "truncated"),
        (Bytes::default().u8(b'I').i32(1).u8(b'X').0, "unexpected"),
        (
            Bytes::default().u8(b'I').i32(1).u8(b'N').i16(-1).0,
            "negative",
        ),
        (
            Bytes::default()
                .u8(b'I')
                .i32(1)
                .u8(b'N')
                .i16(1)
                .u8(b't')
                .i32(100)
                .0,
            "truncated",
        ),
        (Bytes::default().u8(b'O').u64(1).u8(b'x').0, "truncated"),
        (
            Bytes::default().u8(b'B').u64(1).u64(1).i32(1).u8(0).0,
            "trailing",
        ),
        (
            Bytes::default().u8(b'Y').i32(1).u8(0xff).u8(0).cstr("t").0,
            "UTF-8",
        ),
    ];
    for (bytes, expected) in cases {
        let err = decode(&bytes).unwrap_err().to_string();
        assert!(err.contains(expected), "{bytes:?}: {err}");
    }
}

mod captured {
    //! Bytes captured from PostgreSQL 15 (see integration/capture.rs for the scenario).
    use super::super::*;
    use crate::pipeline::pgoutput::captured_fixtures;

    fn decoded() -> Vec<(char, Vec<u8>)> {
        captured_fixtures()
    }

    fn texts(tuple: &TupleData<'_>) -> Vec<Option<String>> {
        tuple
            .iter()
            .map(|value| match value {
                ColumnValue::Text(text) => Some(String::from_utf8_lossy(text).into_owned()),
                ColumnValue::Null => Some("<null>".into()),
                ColumnValue::UnchangedToast => Some("<unchanged>".into()),
                ColumnValue::Binary(_) => None,
            })
            .collect()
    }

    #[test]
    fn every_captured_message_decodes_with_its_tag() {
        let fixtures = decoded();
        assert!(fixtures.len() > 20);
        for (tag, bytes) in &fixtures {
            let message = decode(bytes).unwrap_or_else(|e| panic!("{tag}: {e}"));
            let expected = match message {
                Message::Begin(_) => 'B',
                Message::Commit(_) => 'C',
                Message::Origin(_) => 'O',
                Message::Relation(_) => 'R',
                Message::Type(_) => 'Y',
                Message::Insert(_) => 'I',
                Message::Update(_) => 'U',
                Message::Delete(_) => 'D',
                Message::Truncate(_) => 'T',
                Message::LogicalMessage(_) => 'M',
            };
            assert_eq!(*tag, expected);
        }
    }

    #[test]
    fn begin_and_commit_agree_on_the_commit_lsn() {
        let fixtures = decoded();
        let mut open: Option<Begin> = None;
        for (_, bytes) in &fixtures {
            match decode(bytes).unwrap() {
                Message::Begin(begin) => open = Some(begin),
                Message::Commit(commit) => {
                    let begin = open.take().expect("commit after begin");
                    assert_eq!(begin.final_lsn, commit.commit_lsn);
                    assert!(commit.end_lsn > commit.commit_lsn);
                    assert_eq!(begin.commit_time_micros, commit.commit_time_micros);
                }
                _ => {}
            }
        }
    }

    #[test]
    fn relation_type_and_rows_of_the_scenario() {
        let fixtures = decoded();
        let messages: Vec<Message<'_>> = fixtures.iter().map(|(_, b)| decode(b).unwrap()).collect();
        let Message::Type(mood) = &messages[1] else {
            panic!("{:?}", messages[1])
        };
        assert_eq!(
            (mood.namespace.as_str(), mood.name.as_str()),
            ("public", "mood")
        );
        let Message::Relation(cap) = &messages[2] else {
            panic!()
        };
        assert_eq!(cap.name, "t_cap");
        assert_eq!(cap.replica_identity, ReplicaIdentity::Default);
        let types: Vec<u32> = cap.columns.iter().map(|c| c.type_oid).collect();
        assert_eq!(types, [23, 25, 1700, 1007, 3802, mood.oid, 25]);
        assert_eq!(cap.columns.iter().filter(|c| c.is_key).count(), 1);

        let Message::Insert(insert) = &messages[3] else {
            panic!()
        };
        let values = texts(&insert.new);
        assert_eq!(
            values[..6]
                .iter()
                .map(|v| v.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["1", "one", "1.50", "{1,NULL}", "{\"k\": 2.50}", "happy"]
        );
        assert_eq!(values[6].as_ref().map(String::len), Some(3000));

        // UPDATE of a non-key column: no old image, the TOASTed column is not resent.
        let Message::Update(update) = &messages[6] else {
            panic!()
        };
        assert!(update.old.is_none());
        assert_eq!(texts(&update.new)[6].as_deref(), Some("<unchanged>"));

        // UPDATE of the key: a key-only old image with the other columns null.
        let Message::Update(key_change) = &messages[9] else {
            panic!()
        };
        let (kind, old) = key_change.old.as_ref().unwrap();
        assert_eq!(*kind, OldKind::Key);
        assert_eq!(texts(old)[0].as_deref(), Some("1"));
        assert!(texts(old)[1..]
            .iter()
            .all(|v| v.as_deref() == Some("<null>")));

        // REPLICA IDENTITY FULL: every column flagged as key, a full old image.
        let Message::Relation(full) = &messages[12] else {
            panic!()
        };
        assert_eq!(full.replica_identity, ReplicaIdentity::Full);
        assert!(full.columns.iter().all(|c| c.is_key));
        let Message::Update(full_update) = &messages[13] else {
            panic!()
        };
        let (kind, old) = full_update.old.as_ref().unwrap();
        assert_eq!(*kind, OldKind::Full);
        assert_eq!(texts(old)[1].as_deref(), Some("old"));
        assert_eq!(texts(old)[2].as_ref().map(String::len), Some(3000));

        let deletes: Vec<&Delete<'_>> = messages
            .iter()
            .filter_map(|m| {
                if let Message::Delete(d) = m {
                    Some(d)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(deletes[0].old_kind, OldKind::Key);
        assert_eq!(deletes[1].old_kind, OldKind::Full);

        let logical: Vec<&LogicalMessage<'_>> = messages
            .iter()
            .filter_map(|m| {
                if let Message::LogicalMessage(l) = m {
                    Some(l)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            (
                logical[0].transactional,
                logical[0].prefix,
                logical[0].content
            ),
            (true, "audit", &b"inside"[..])
        );
        assert_eq!(
            (logical[1].transactional, logical[1].prefix),
            (false, "heartbeat")
        );

        let Some(Message::Truncate(truncate)) =
            messages.iter().find(|m| matches!(m, Message::Truncate(_)))
        else {
            panic!("no truncate")
        };
        assert!(truncate.cascade && truncate.restart_identity);
        assert_eq!(truncate.relation_oids, [cap.oid, full.oid]);
    }
}
