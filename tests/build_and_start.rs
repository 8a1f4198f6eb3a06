//! Errors a user can cause — bad specs, failing starts — come back as values naming the child.

mod common;

use std::time::Duration;

use actix_supervisor::*;
use common::*;

fn err(b: TreeBuilder) -> BuildError {
    b.build().expect_err("the spec is invalid")
}

#[test]
fn duplicate_sibling_names_are_rejected() {
    let log = Log::default();
    let e = err(Tree::builder("t").child(
        SupervisorSpec::new("s")
            .child(simple("a", &log))
            .child(simple("a", &log)),
    ));
    assert_eq!(
        e,
        BuildError::DuplicateName {
            parent: "s".into(),
            name: "a".into()
        }
    );
    assert_eq!(e.to_string(), "duplicate child name `a` under `s`");
    // The same name under different parents is fine.
    Tree::builder("t")
        .child(SupervisorSpec::new("x").child(simple("a", &log)))
        .child(SupervisorSpec::new("y").child(simple("a", &log)))
        .build()
        .unwrap();
}

#[test]
fn names_must_be_path_segments() {
    let log = Log::default();
    assert!(matches!(
        err(Tree::builder("t").child(simple("", &log))),
        BuildError::InvalidName { .. }
    ));
    let e = err(Tree::builder("t").child(simple("a/b", &log)));
    assert!(e.to_string().contains("`a/b`"), "{e}");
}

#[test]
fn unknown_dependencies_are_named() {
    let log = Log::default();
    let e = err(Tree::builder("t")
        .child(SupervisorSpec::new("s").child(simple("a", &log).depends_on("nope"))));
    assert_eq!(
        e,
        BuildError::UnknownDependency {
            child: "s/a".into(),
            dependency: "nope".into()
        }
    );
    assert!(e.to_string().contains("`s/a` depends on `nope`"), "{e}");
}

#[test]
fn cycles_are_rejected_with_the_cycle_named() {
    let log = Log::default();
    let e = err(Tree::builder("t")
        .child(simple("a", &log).depends_on("b"))
        .child(simple("b", &log).depends_on("c"))
        .child(simple("c", &log).depends_on("a")));
    let BuildError::Cycle(path) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(path.first(), path.last());
    for n in ["a", "b", "c"] {
        assert!(path.contains(&n.to_owned()), "{path:?}");
    }
    assert!(e.to_string().starts_with("dependency cycle: "), "{e}");
    assert_eq!(e.to_string().matches(" -> ").count(), 3, "{e}");

    // Across supervisors, by path.
    let e = err(Tree::builder("t")
        .child(SupervisorSpec::new("x").child(simple("a", &log).depends_on("y/b")))
        .child(SupervisorSpec::new("y").child(simple("b", &log).depends_on("x/a"))));
    assert!(
        matches!(&e, BuildError::Cycle(p) if p.contains(&"x/a".to_owned()) && p.contains(&"y/b".to_owned())),
        "{e}"
    );

    // A child depending on its own supervisor cannot be ordered either.
    let e =
        err(Tree::builder("t")
            .child(SupervisorSpec::new("s").child(simple("a", &log).depends_on("s"))));
    assert!(
        matches!(&e, BuildError::Cycle(p) if p.contains(&"s/a".to_owned())),
        "{e}"
    );

    // Self-dependency.
    assert!(matches!(
        err(Tree::builder("t").child(simple("a", &log).depends_on("a"))),
        BuildError::Cycle(_)
    ));
}

#[test]
fn zero_durations_are_rejected() {
    let log = Log::default();
    let e = err(Tree::builder("t")
        .child(SupervisorSpec::new("s").child(simple("a", &log).budget(Duration::ZERO))));
    assert_eq!(
        e,
        BuildError::ZeroDuration {
            what: "budget of `s/a`".into()
        }
    );
    assert!(matches!(
        err(Tree::builder("t").deadline(Duration::ZERO)),
        BuildError::ZeroDuration { .. }
    ));
    assert!(matches!(
        err(Tree::builder("t").worker_budget(Duration::ZERO)),
        BuildError::ZeroDuration { .. }
    ));
}

#[test]
fn pools_must_be_declared_and_non_empty() {
    let log = Log::default();
    let e =
        err(Tree::builder("t").child(simple("a", &log).placement(Placement::Pool("cpu".into()))));
    assert_eq!(
        e,
        BuildError::UnknownPool {
            child: "a".into(),
            pool: "cpu".into()
        }
    );
    assert!(matches!(
        err(Tree::builder("t").pool("cpu", 0)),
        BuildError::EmptyPool(_)
    ));
}

#[actix::test]
async fn a_failing_factory_stops_the_start_and_shuts_down_what_started() {
    init_log();
    let log = Log::default();
    let failing = ChildSpec::try_worker("b", || -> Result<Probe, BoxError> {
        Err("no database at localhost:5432".into())
    });
    let tree = Tree::builder("t")
        .child(simple("a0", &log))
        .child(simple("a1", &log))
        .child(SupervisorSpec::new("s").child(failing))
        .child(simple("c", &log))
        .build()
        .unwrap();
    let e = tree.start().await.expect_err("b fails");
    assert_eq!(e.child, "s/b");
    assert!(e.cause.contains("no database"), "{e}");
    assert_eq!(
        e.to_string(),
        "child `s/b` failed to start: no database at localhost:5432"
    );
    let r = &e.report;
    assert_eq!(r.find("a0").unwrap().outcome, Outcome::Drained);
    assert_eq!(r.find("a1").unwrap().outcome, Outcome::Drained);
    assert!(matches!(r.find("s/b").unwrap().outcome, Outcome::Failed(_)));
    assert_eq!(r.find("c").unwrap().outcome, Outcome::NotRunning);
    // Reverse start order: a1 stopped (and finished) before a0 was told.
    let ev = log.events();
    let pos = |e: Ev| ev.iter().position(|x| *x == e).unwrap();
    assert!(
        pos(Ev::Drained("a1".into())) < pos(Ev::Stopping("a0".into())),
        "{ev:?}"
    );
    assert!(
        !ev.contains(&Ev::Started("c".into())),
        "nothing after the failure starts"
    );
}

#[actix::test]
async fn a_panic_in_started_is_a_start_failure() {
    init_log();
    let log = Log::default();
    let (bad, _) = probe(
        "bad",
        "bad",
        &log,
        Behaviour {
            panic_in_started: true,
            ..Behaviour::default()
        },
    );
    let tree = Tree::builder("t")
        .child(simple("ok", &log))
        .child(bad)
        .build()
        .unwrap();
    let e = tree.start().await.expect_err("bad panics");
    assert_eq!(e.child, "bad");
    assert!(e.cause.contains("bad refuses to start"), "{e}");
    assert_eq!(e.report.find("ok").unwrap().outcome, Outcome::Drained);
    assert!(matches!(
        e.report.find("bad").unwrap().outcome,
        Outcome::Panicked(_)
    ));
}

#[test]
fn starting_outside_an_actix_system_is_an_error_not_a_panic() {
    let log = Log::default();
    let tree = Tree::builder("t").child(simple("a", &log)).build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt.block_on(tree.start()).expect_err("no actix System here");
    assert!(e.cause.contains("inside a running actix System"), "{e}");
}
