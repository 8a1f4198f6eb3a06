//! The tree as the runtime sees it: every child flattened into an arena, dependencies resolved
//! to ids, and the start order computed — all checked once, when the tree is built.
//!
//! Ordering rules, stated as events (`told(n)`, `ack(n)`; mirrored for start):
//! a supervisor is told before its children and acknowledges after them; a dependency is told
//! only after each of its dependents acknowledged. If those edges form a cycle no order exists,
//! and the build fails naming the cycle. The start order is the mirror image, with ties broken by
//! declaration order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::error::BuildError;
use crate::protocol::NodeId;
use crate::spec::{ChildSpec, Placement, SpecKind, WorkerControl};
use crate::supervision::{Restart, Supervision};

/// The root's id: the arena's first node, a supervisor with the tree's name.
pub(crate) const ROOT: NodeId = NodeId(0);

pub(crate) struct Node {
    pub(crate) name: Box<str>,
    pub(crate) parent: Option<NodeId>,
    // Boxed slices, not vectors: a tree of 100,000 leaves has 300,000 of these, nearly all empty.
    pub(crate) children: Box<[NodeId]>,
    pub(crate) deps: Box<[NodeId]>,
    pub(crate) dependents: Box<[NodeId]>,
    /// The shutdown budget in nanoseconds (8 bytes rather than `Option<Duration>`'s 16).
    budget_ns: Option<std::num::NonZeroU64>,
    /// `None` for [`Placement::Parent`], the common case, to keep nodes small.
    pub(crate) placement: Option<Box<Placement>>,
    /// `Some` for a worker.
    pub(crate) worker: Option<Arc<dyn WorkerControl>>,
}

impl Node {
    pub(crate) fn budget(&self) -> Option<Duration> {
        self.budget_ns.map(|ns| Duration::from_nanos(ns.get()))
    }
}

pub(crate) struct Graph {
    pub(crate) nodes: Vec<Node>,
    /// Workers in the order they start.
    pub(crate) start_order: Vec<NodeId>,
    /// Per node, its place in the start order (supervisors included): siblings are restarted,
    /// and rest-for-one picks "those started after", by it.
    pub(crate) start_rank: Vec<u32>,
    /// Restart policies other than the default, and supervisors' settings other than the
    /// defaults: kept beside the nodes rather than in them, since nearly every child of a big
    /// tree has the defaults and a node's size is paid 100,000 times.
    restarts: HashMap<NodeId, Restart>,
    supervisions: HashMap<NodeId, Supervision>,
}

impl Graph {
    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// A child's restart policy.
    pub(crate) fn restart(&self, id: NodeId) -> Restart {
        self.restarts.get(&id).copied().unwrap_or_default()
    }

    /// A supervisor's strategy, intensity and backoff.
    pub(crate) fn supervision(&self, id: NodeId) -> Supervision {
        self.supervisions.get(&id).copied().unwrap_or_default()
    }

    /// `parent/child` path from the root (the root itself is the empty path).
    pub(crate) fn path(&self, id: NodeId) -> String {
        let mut segments = Vec::new();
        let mut cur = Some(id);
        while let Some(n) = cur {
            if n == ROOT {
                break;
            }
            segments.push(&*self.node(n).name);
            cur = self.node(n).parent;
        }
        segments.reverse();
        segments.join("/")
    }

    /// Builds and checks the graph from the root's children.
    pub(crate) fn build(
        tree_name: &str,
        children: Vec<ChildSpec>,
        root: Supervision,
        pools: &HashMap<String, usize>,
    ) -> Result<Graph, BuildError> {
        check_supervision(&root, "the root")?;
        let mut g = Graph {
            nodes: vec![Node {
                name: tree_name.into(),
                parent: None,
                children: Box::default(),
                deps: Box::default(),
                dependents: Box::default(),
                budget_ns: None,
                placement: None,
                worker: None,
            }],
            start_order: Vec::new(),
            start_rank: Vec::new(),
            restarts: HashMap::new(),
            supervisions: HashMap::new(),
        };
        if root != Supervision::default() {
            g.supervisions.insert(ROOT, root);
        }
        let mut declared_deps: Vec<Vec<String>> = vec![Vec::new()];
        let mut children_of: Vec<Vec<NodeId>> = vec![Vec::new()];
        // Depth-first, parents before children, so ids follow declaration order.
        let mut stack: Vec<(NodeId, std::vec::IntoIter<ChildSpec>)> =
            vec![(ROOT, children.into_iter())];
        while let Some((parent, iter)) = stack.last_mut() {
            let parent = *parent;
            let Some(spec) = iter.next() else {
                stack.pop();
                continue;
            };
            let id = NodeId(g.nodes.len() as u32);
            let common = spec.common;
            if common.name.is_empty() || common.name.contains('/') {
                return Err(BuildError::InvalidName {
                    parent: g.path(parent),
                    name: common.name,
                });
            }
            if common.budget == Some(Duration::ZERO) {
                return Err(BuildError::ZeroDuration {
                    what: format!("budget of `{}`", join(&g.path(parent), &common.name)),
                });
            }
            if let Placement::Pool(pool) = &common.placement {
                match pools.get(pool) {
                    None => {
                        return Err(BuildError::UnknownPool {
                            child: join(&g.path(parent), &common.name),
                            pool: pool.clone(),
                        })
                    }
                    Some(0) => return Err(BuildError::EmptyPool(pool.clone())),
                    Some(_) => {}
                }
            }
            children_of[parent.index()].push(id);
            children_of.push(Vec::new());
            declared_deps.push(common.depends_on);
            let (worker, grandchildren) = match spec.kind {
                SpecKind::Worker(w) => (Some(w), None),
                SpecKind::Supervisor(children, sup) => {
                    check_supervision(&sup, &format!("`{}`", join(&g.path(parent), &common.name)))?;
                    if sup != Supervision::default() {
                        g.supervisions.insert(id, sup);
                    }
                    (None, Some(children))
                }
            };
            if common.restart != Restart::default() {
                g.restarts.insert(id, common.restart);
            }
            g.nodes.push(Node {
                name: common.name.into_boxed_str(),
                parent: Some(parent),
                children: Box::default(),
                deps: Box::default(),
                dependents: Box::default(),
                budget_ns: common.budget.and_then(|b| {
                    std::num::NonZeroU64::new(u64::try_from(b.as_nanos()).unwrap_or(u64::MAX))
                }),
                placement: match common.placement {
                    Placement::Parent => None,
                    other => Some(Box::new(other)),
                },
                worker,
            });
            if let Some(children) = grandchildren {
                stack.push((id, children.into_iter()));
            }
        }
        // Large trees are built by pushing; keep only what is used.
        g.nodes.shrink_to_fit();
        for (node, children) in g.nodes.iter_mut().zip(children_of) {
            node.children = children.into_boxed_slice();
        }
        g.check_duplicates()?;
        g.resolve_deps(declared_deps)?;
        g.check_cycles()?;
        (g.start_order, g.start_rank) = g.compute_start_order();
        Ok(g)
    }

    fn check_duplicates(&self) -> Result<(), BuildError> {
        for (i, node) in self.nodes.iter().enumerate() {
            let mut names: Vec<&str> = node.children.iter().map(|&c| &*self.node(c).name).collect();
            names.sort_unstable();
            if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(BuildError::DuplicateName {
                    parent: self.path(NodeId(i as u32)),
                    name: pair[0].to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Resolves each declared dependency: a sibling's name, else a path from the root.
    fn resolve_deps(&mut self, declared: Vec<Vec<String>>) -> Result<(), BuildError> {
        if declared.iter().all(|d| d.is_empty()) {
            return Ok(());
        }
        let mut edges = Vec::new();
        {
            let by_name: HashMap<(NodeId, &str), NodeId> = (1..self.nodes.len())
                .map(|i| {
                    let n = &self.nodes[i];
                    ((n.parent.unwrap_or(ROOT), &*n.name), NodeId(i as u32))
                })
                .collect();
            let by_path = |path: &str| {
                path.split('/')
                    .try_fold(ROOT, |at, segment| by_name.get(&(at, segment)).copied())
            };
            for (i, names) in declared.iter().enumerate() {
                let id = NodeId(i as u32);
                let parent = self.node(id).parent.unwrap_or(ROOT);
                for name in names {
                    let Some(dep) = by_name
                        .get(&(parent, name.as_str()))
                        .copied()
                        .or_else(|| by_path(name))
                    else {
                        return Err(BuildError::UnknownDependency {
                            child: self.path(id),
                            dependency: name.clone(),
                        });
                    };
                    edges.push((id, dep));
                }
            }
        }
        edges.sort_unstable();
        edges.dedup();
        let mut deps: Vec<Vec<NodeId>> = vec![Vec::new(); self.nodes.len()];
        let mut dependents: Vec<Vec<NodeId>> = vec![Vec::new(); self.nodes.len()];
        for (id, dep) in edges {
            deps[id.index()].push(dep);
            dependents[dep.index()].push(id);
        }
        for ((node, deps), dependents) in self.nodes.iter_mut().zip(deps).zip(dependents) {
            node.deps = deps.into_boxed_slice();
            node.dependents = dependents.into_boxed_slice();
        }
        Ok(())
    }

    /// The node at `path` (like `workers/3`), walking names from the root.
    pub(crate) fn find(&self, path: &str) -> Option<NodeId> {
        path.split('/').try_fold(ROOT, |at, segment| {
            self.node(at)
                .children
                .iter()
                .copied()
                .find(|&c| &*self.node(c).name == segment)
        })
    }

    /// Successors of an event in the stop-order graph. Event `2n` is `told(n)`, `2n+1` is `ack(n)`.
    fn stop_edges(&self, event: usize, out: &mut Vec<usize>) {
        out.clear();
        let n = &self.nodes[event / 2];
        if event.is_multiple_of(2) {
            out.push(event + 1);
            out.extend(n.children.iter().map(|c| c.index() * 2));
        } else {
            if let Some(p) = n.parent {
                out.push(p.index() * 2 + 1);
            }
            out.extend(n.deps.iter().map(|d| d.index() * 2));
        }
    }

    fn check_cycles(&self) -> Result<(), BuildError> {
        const WHITE: u8 = 0;
        const GREY: u8 = 1;
        const BLACK: u8 = 2;
        let events = self.nodes.len() * 2;
        let mut color = vec![WHITE; events];
        let mut scratch = Vec::new();
        for start in 0..events {
            if color[start] != WHITE {
                continue;
            }
            // Iterative DFS; the stack holds (event, its successors, next successor index).
            let mut stack: Vec<(usize, Vec<usize>, usize)> = Vec::new();
            self.stop_edges(start, &mut scratch);
            stack.push((start, scratch.clone(), 0));
            color[start] = GREY;
            while let Some((event, succ, idx)) = stack.last_mut() {
                if *idx == succ.len() {
                    color[*event] = BLACK;
                    stack.pop();
                    continue;
                }
                let next = succ[*idx];
                *idx += 1;
                match color[next] {
                    WHITE => {
                        color[next] = GREY;
                        self.stop_edges(next, &mut scratch);
                        stack.push((next, scratch.clone(), 0));
                    }
                    GREY => {
                        let from = stack.iter().position(|(e, _, _)| *e == next).unwrap_or(0);
                        let mut cycle: Vec<String> = Vec::new();
                        for (e, _, _) in &stack[from..] {
                            let path = self.display_path(NodeId((e / 2) as u32));
                            if cycle.last() != Some(&path) {
                                cycle.push(path);
                            }
                        }
                        let first = cycle.first().cloned().unwrap_or_default();
                        if cycle.last() != Some(&first) || cycle.len() == 1 {
                            cycle.push(first);
                        }
                        return Err(BuildError::Cycle(cycle));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn display_path(&self, id: NodeId) -> String {
        if id == ROOT {
            self.node(ROOT).name.to_string()
        } else {
            self.path(id)
        }
    }

    /// Workers in start order: the mirror of the stop order, ties broken by declaration order.
    /// Start events: `begin(n)` = 2n, `done(n)` = 2n+1. begin(p) → begin(c); done(c) → done(p);
    /// done(dep) → begin(dependent); begin(n) → done(n).
    fn compute_start_order(&self) -> (Vec<NodeId>, Vec<u32>) {
        let n = self.nodes.len();
        let mut indegree = vec![0u32; n * 2];
        for (i, node) in self.nodes.iter().enumerate() {
            indegree[i * 2 + 1] += 1 + node.children.len() as u32;
            indegree[i * 2] += node.deps.len() as u32 + u32::from(node.parent.is_some());
        }
        let mut ready: BinaryHeap<Reverse<(usize, usize)>> = BinaryHeap::new();
        for (e, d) in indegree.iter().enumerate() {
            if *d == 0 {
                ready.push(Reverse((e / 2, e)));
            }
        }
        let mut order = Vec::new();
        let mut rank = vec![0u32; n];
        let mut next_rank = 0u32;
        let release =
            |e: usize, indegree: &mut Vec<u32>, ready: &mut BinaryHeap<Reverse<(usize, usize)>>| {
                indegree[e] -= 1;
                if indegree[e] == 0 {
                    ready.push(Reverse((e / 2, e)));
                }
            };
        while let Some(Reverse((i, e))) = ready.pop() {
            let node = &self.nodes[i];
            if e.is_multiple_of(2) {
                rank[i] = next_rank;
                next_rank += 1;
                if node.worker.is_some() {
                    order.push(NodeId(i as u32));
                }
                release(e + 1, &mut indegree, &mut ready);
                for c in &node.children {
                    release(c.index() * 2, &mut indegree, &mut ready);
                }
            } else {
                if let Some(p) = node.parent {
                    release(p.index() * 2 + 1, &mut indegree, &mut ready);
                }
                for d in &node.dependents {
                    release(d.index() * 2, &mut indegree, &mut ready);
                }
            }
        }
        (order, rank)
    }
}

/// A supervisor's settings make sense: a non-zero intensity window and backoff bounds.
fn check_supervision(sup: &Supervision, who: &str) -> Result<(), BuildError> {
    if sup.intensity.window.is_zero() {
        return Err(BuildError::ZeroDuration {
            what: format!("restart intensity window of {who}"),
        });
    }
    if let Some(b) = sup.backoff {
        if b.min.is_zero() {
            return Err(BuildError::ZeroDuration {
                what: format!("minimum restart backoff of {who}"),
            });
        }
        if b.min > b.max {
            return Err(BuildError::InvalidBackoff {
                supervisor: who.to_owned(),
                min: b.min,
                max: b.max,
            });
        }
    }
    Ok(())
}

pub(crate) fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        let mut path = String::with_capacity(parent.len() + 1 + name.len());
        path.push_str(parent);
        path.push('/');
        path.push_str(name);
        path
    }
}
