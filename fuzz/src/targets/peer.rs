//! A peer that says exactly the fuzz input: the QMP and NBD targets run the real async clients
//! over an in-memory pipe whose other end writes the input, then hangs up (so a client waiting
//! for more sees end of stream at once, never a timeout) and swallows whatever the client says.

use std::future::Future;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Run `client` on a single-threaded runtime (one per thread, reused between inputs) with the
/// client's end of a pipe whose far end sends `input`.
pub fn with_peer<F, Fut>(input: &[u8], client: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    let input = input.to_vec();
    RT.with(|rt| {
        rt.block_on(async move {
            // Room for the whole input and everything the client writes back.
            let (near, mut far) = tokio::io::duplex(1 << 18);
            let peer = tokio::spawn(async move {
                let _ = far.write_all(&input).await;
                let _ = far.shutdown().await;
                let mut sink = [0u8; 4096];
                while matches!(far.read(&mut sink).await, Ok(n) if n > 0) {}
            });
            client(near).await;
            peer.abort();
            let _ = peer.await;
        })
    });
}
