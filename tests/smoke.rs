use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_supervisor::*;

struct Count(Arc<AtomicU64>);
impl Actor for Count {
    type Context = Context<Self>;
}
impl Worker for Count {}

#[derive(Message)]
#[rtype(result = "()")]
struct Inc;
impl Handler<Inc> for Count {
    type Result = ();
    fn handle(&mut self, _: Inc, _: &mut Context<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[actix::test]
async fn smoke() {
    let _ = env_logger::builder().is_test(true).try_init();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    let spec = ChildSpec::worker("count", move || Count(n2.clone()));
    let addr = spec.addr();
    let tree = Tree::builder("t")
        .child(SupervisorSpec::new("sup").child(spec))
        .build()
        .unwrap();
    let h = tree.start().await.unwrap();
    for _ in 0..1000 {
        addr.do_send(Inc).unwrap();
    }
    let r = h.shutdown("test").await;
    eprintln!("{r}");
    assert_eq!(n.load(Ordering::Relaxed), 1000);
    assert!(addr.do_send(Inc).is_err());
    assert_eq!(r.exit_code(), 0);
    let _ = Duration::ZERO;
}
