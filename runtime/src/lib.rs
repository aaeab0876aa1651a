//! nvmirror's embedded runtime: what drives the engine core on real threads, memory and sockets.
