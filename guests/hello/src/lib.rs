//! The sample worker: `Hello from Lattice` for every request. It imports nothing but
//! `wasi:http`, so it also measures the runtime's own per-request cost.

use wasip2::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Hello;

wasip2::http::proxy::export!(Hello);

const BODY: &[u8] = b"Hello from Lattice\n";

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let headers = Fields::new();
        let _ = headers.append("content-type", b"text/plain; charset=utf-8");
        let resp = OutgoingResponse::new(headers);
        let Ok(body) = resp.body() else {
            ResponseOutparam::set(out, Ok(resp));
            return;
        };
        ResponseOutparam::set(out, Ok(resp));
        if let Ok(stream) = body.write() {
            let _ = stream.blocking_write_and_flush(BODY);
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
