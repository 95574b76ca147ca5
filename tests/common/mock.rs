//! One mock upstream for the integration tests: std threads, HTTP/1.1 keep-alive, a route table, and a record
//! of every request it was sent.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::read_request_head;

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Request line and header lines, each ending in CRLF, without the blank line.
    pub head: String,
    /// The body; recorded copies hold it only when the mock was built with `record_bodies`.
    pub body: Vec<u8>,
    /// 1 for the first connection the mock accepted, 2 for the second…
    pub connection: usize,
    /// 1 for the first request on its connection, 2 for the second…
    pub n: usize,
}

impl Request {
    /// The request line without its line end.
    pub fn line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    /// The request target exactly as sent.
    pub fn target(&self) -> &str {
        self.line().split(' ').nth(1).unwrap_or_default()
    }

    /// The value of header `name`, the first if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// The target's path, without the query.
    pub fn path(&self) -> &str {
        self.target().split('?').next().unwrap_or_default()
    }
}

/// What the connection does once the answer is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum After {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Answers with `Connection: close` and closes it.
    SayClose,
    /// Closes it without a word, as a server whose keep-alive timeout just ran out does.
    SilentClose,
}

/// How the answer goes on the wire: whole, or one of the ways a failing upstream breaks it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wire {
    Whole,
    /// Nothing at all: the connection is shut down.
    Reset,
    /// Nothing until the peer gives up and closes (or 30 s pass).
    Hang,
    /// The head announces the whole body, half of it follows, then the connection closes.
    Truncated,
}

/// A handler's answer.
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Duration,
    drip: Option<(usize, Duration)>,
    after: After,
    wire: Wire,
}

impl Reply {
    /// `status` with `body` of `content_type`, on a connection kept alive.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
            delay: Duration::ZERO,
            drip: None,
            after: After::KeepAlive,
            wire: Wire::Whole,
        }
    }

    /// No answer: the connection is shut down once the request is read.
    pub fn reset() -> Reply {
        Reply {
            wire: Wire::Reset,
            ..Reply::empty(0)
        }
    }

    /// No answer: the connection is held open until the peer closes it (or 30 s pass).
    pub fn hang() -> Reply {
        Reply {
            wire: Wire::Hang,
            ..Reply::empty(0)
        }
    }

    /// `status` with no body and no `Content-Type`.
    pub fn empty(status: u16) -> Reply {
        Reply {
            headers: Vec::new(),
            ..Reply::new(status, "", "")
        }
    }

    /// 200 with a FHIR JSON body.
    pub fn fhir(body: impl Into<Vec<u8>>) -> Reply {
        Reply::new(200, "application/fhir+json", body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Announces the whole body but sends only its first half, then closes the connection.
    pub fn truncated(mut self) -> Reply {
        self.wire = Wire::Truncated;
        self
    }

    /// Sets the status.
    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    /// Waits `delay` before answering.
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// Writes the body `chunk` bytes at a time, `pause` before each.
    pub fn drip(mut self, chunk: usize, pause: Duration) -> Reply {
        self.drip = Some((chunk.max(1), pause));
        self
    }

    /// What the connection does after this answer.
    pub fn then(mut self, after: After) -> Reply {
        self.after = after;
        self
    }

    /// Writes the answer; false when the connection is done with (the peer is gone, or the reply ends it).
    fn write(&self, stream: &mut TcpStream) -> bool {
        std::thread::sleep(self.delay);
        match self.wire {
            Wire::Whole => self.write_whole(stream) && self.after == After::KeepAlive,
            Wire::Reset => {
                let _ = stream.shutdown(Shutdown::Both);
                false
            }
            Wire::Hang => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 256];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                false
            }
            Wire::Truncated => {
                let _ = stream.write_all(self.head().as_bytes());
                let _ = stream.write_all(&self.body[..self.body.len() / 2]);
                let _ = stream.flush();
                let _ = stream.shutdown(Shutdown::Both);
                false
            }
        }
    }

    /// Status line and headers, with the blank line.
    fn head(&self) -> String {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        if self.after == After::SayClose {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        head
    }

    /// The whole answer, dripped when asked; false when the peer is gone.
    fn write_whole(&self, stream: &mut TcpStream) -> bool {
        if stream.write_all(self.head().as_bytes()).is_err() {
            return false;
        }
        match self.drip {
            None => stream.write_all(&self.body).is_ok(),
            Some((chunk, pause)) => self.body.chunks(chunk).all(|part| {
                std::thread::sleep(pause);
                stream.write_all(part).is_ok()
            }),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

type Handler = Box<dyn Fn(&Request) -> Reply + Send + Sync>;
type PathMatch = Box<dyn Fn(&str) -> bool + Send + Sync>;

struct Route {
    method: Option<String>,
    path: PathMatch,
    handler: Handler,
}

/// The route table of a mock not yet started; the first matching route answers, unmatched requests get 404.
#[derive(Default)]
pub struct Routes {
    routes: Vec<Route>,
    record_bodies: bool,
}

impl Routes {
    /// Answers `method` (any method when `None`) on paths for which `path` holds.
    pub fn route(
        mut self,
        method: Option<&str>,
        path: impl Fn(&str) -> bool + Send + Sync + 'static,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Routes {
        self.routes.push(Route {
            method: method.map(str::to_owned),
            path: Box::new(path),
            handler: Box::new(handler),
        });
        self
    }

    /// Answers every request not matched by an earlier route.
    pub fn any(self, handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Routes {
        self.route(None, |_| true, handler)
    }

    /// Keeps request bodies in the record, not only the heads.
    pub fn record_bodies(mut self) -> Routes {
        self.record_bodies = true;
        self
    }

    /// Serves on a free port.
    pub fn start(self) -> Mock {
        self.start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// Serves on `listener`, e.g. one bound to an address that must come back.
    pub fn start_on(self, listener: TcpListener) -> Mock {
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            routes: self.routes,
            record_bodies: self.record_bodies,
            requests: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
        });
        let serving = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let connection = serving.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let serving = serving.clone();
                std::thread::spawn(move || serving.serve(stream, connection));
            }
        });
        Mock { origin, shared }
    }
}

struct Shared {
    routes: Vec<Route>,
    record_bodies: bool,
    requests: Mutex<Vec<Request>>,
    accepted: AtomicUsize,
}

impl Shared {
    /// Answers the requests of one connection until it closes or a reply ends it.
    fn serve(&self, stream: TcpStream, connection: usize) {
        // A client that stalls mid-request must not pin this thread forever.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        for n in 1.. {
            let Some((head, length)) = read_request_head(&mut reader) else {
                return;
            };
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let request = Request {
                head,
                body,
                connection,
                n,
            };
            let mut recorded = request.clone();
            if !self.record_bodies {
                recorded.body.clear();
            }
            self.requests.lock().unwrap().push(recorded);
            let method = request.line().split(' ').next().unwrap_or_default();
            let reply = self
                .routes
                .iter()
                .find(|r| {
                    r.method.as_deref().is_none_or(|m| m == method) && (r.path)(request.path())
                })
                .map(|r| (r.handler)(&request))
                .unwrap_or_else(|| Reply::new(404, "text/plain", "no route"));
            if !reply.write(&mut writer) {
                return;
            }
        }
    }
}

/// A running mock upstream; it serves until the test process ends.
pub struct Mock {
    origin: String,
    shared: Arc<Shared>,
}

impl Mock {
    /// A mock with an empty route table.
    pub fn routes() -> Routes {
        Routes::default()
    }

    /// `http://127.0.0.1:PORT`
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// `http://127.0.0.1:PORT/fhir`
    pub fn base(&self) -> String {
        format!("{}/fhir", self.origin)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The heads of every request received so far.
    pub fn heads(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.head).collect()
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}
