// Copies the microphone's samples (mixed down to mono, at the AudioContext's rate) to the page in blocks.
const BLOCK = 4096;

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.buffer = new Float32Array(BLOCK);
    this.filled = 0;
    this.stopped = false;
    this.port.onmessage = (event) => {
      if (event.data === "stop") {
        this.flush();
        this.stopped = true;
        this.port.postMessage({ done: true });
      }
    };
  }

  flush() {
    if (this.filled > 0) {
      const block = this.buffer.slice(0, this.filled);
      this.port.postMessage({ samples: block }, [block.buffer]);
      this.filled = 0;
    }
  }

  process(inputs) {
    if (this.stopped) {
      return false;
    }
    const channels = inputs[0];
    if (channels && channels.length > 0) {
      const frames = channels[0].length;
      for (let i = 0; i < frames; i++) {
        let sum = 0;
        for (let c = 0; c < channels.length; c++) {
          sum += channels[c][i];
        }
        this.buffer[this.filled++] = sum / channels.length;
        if (this.filled === BLOCK) {
          this.flush();
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
