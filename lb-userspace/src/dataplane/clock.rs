//! The conntrack clock as the agent sees it. The datapath stamps flows with the kernel's
//! jiffies (`bpf_jiffies64`, which the verifier inlines into a plain load), so lifetimes must
//! be given to it in jiffies, and the agent must read jiffies to age entries. Neither HZ nor
//! jiffies is exposed to a process (`/proc/timer_list` is masked in containers), so the agent
//! asks the kernel through a two-instruction BPF program of its own, run with
//! `BPF_PROG_TEST_RUN`.
//!
//! Written by hand on the `bpf()` system call: aya loads programs only from an object file,
//! and this one must run before the object is loaded (its timeouts depend on HZ).
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_type};

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("loading the clock program (bpf_jiffies64 needs kernel >= 5.5): {0}")]
    Load(io::Error),
    #[error("running the clock program: {0}")]
    Run(io::Error),
    #[error("the kernel's HZ could not be measured: {0} jiffies per second")]
    Hz(f64),
}

/// `BPF_FUNC_jiffies64` in the kernel's helper list.
const BPF_FUNC_JIFFIES64: i32 = 118;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The kernel's jiffies, and how they relate to seconds.
#[derive(Debug)]
pub struct Clock {
    /// `None` only in unit tests that need conversions, not the kernel.
    prog: Option<OwnedFd>,
    hz: u32,
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: the attribute union is fully initialised and sized as the kernel expects.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as i32, attr as *mut bpf_attr, std::mem::size_of::<bpf_attr>() as u32)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

impl Clock {
    /// Loads the program and measures HZ over about 200 ms.
    pub fn new() -> Result<Self, ClockError> {
        // r0 = bpf_jiffies64(); return r0 (an XDP test run returns its low 32 bits).
        let insns = [
            Insn { code: 0x85, regs: 0, off: 0, imm: BPF_FUNC_JIFFIES64 },
            Insn { code: 0x95, regs: 0, off: 0, imm: 0 },
        ];
        let license = c"GPL";
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the PROG_LOAD member of a zeroed union.
        unsafe {
            let load = &mut attr.__bindgen_anon_3;
            load.prog_type = bpf_prog_type::BPF_PROG_TYPE_XDP as u32;
            load.insn_cnt = insns.len() as u32;
            load.insns = insns.as_ptr() as u64;
            load.license = license.as_ptr() as u64;
        }
        let fd = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map_err(ClockError::Load)?;
        // SAFETY: the kernel just gave us this descriptor.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut clock = Self { prog: Some(prog), hz: 0 };
        clock.hz = clock.measure_hz()?;
        Ok(clock)
    }

    /// CONFIG_HZ is one of a few values; the measurement only has to tell them apart. Each
    /// reading is bracketed by two clock reads, so a reading the scheduler delayed (a busy
    /// machine) widens its bracket instead of skewing the rate; a try whose brackets admit no
    /// candidate, or more than one, is repeated.
    fn measure_hz(&self) -> Result<u32, ClockError> {
        let read = || -> Result<(Instant, u32, Instant), ClockError> {
            let before = Instant::now();
            let j = self.jiffies()?;
            Ok((before, j, Instant::now()))
        };
        let mut last = 0.0;
        for _ in 0..20 {
            let (a0, j0, b0) = read()?;
            std::thread::sleep(Duration::from_millis(200));
            let (a1, j1, b1) = read()?;
            let ticks = j1.wrapping_sub(j0) as f64;
            // The true interval lies between these. The count may be off by a few ticks: a
            // tick may be partly in or out at each end, and under NO_HZ a busy machine can
            // update jiffies a few ticks late.
            let (shortest, longest) = ((a1 - b0).as_secs_f64(), (b1 - a0).as_secs_f64());
            let (low, high) = ((ticks - 4.0) / longest, (ticks + 4.0) / shortest.max(1e-6));
            last = ticks / (a1 - a0).as_secs_f64();
            let fits: Vec<u32> =
                [100u32, 250, 300, 1000].into_iter().filter(|&hz| (low..=high).contains(&(hz as f64))).collect();
            if let [hz] = fits[..] {
                return Ok(hz);
            }
        }
        Err(ClockError::Hz(last))
    }

    /// Conversions at a given HZ, without the kernel (`jiffies` fails).
    #[cfg(test)]
    pub fn fixed(hz: u32) -> Self {
        Self { prog: None, hz }
    }

    /// The kernel's jiffies now, low 32 bits: the datapath's clock.
    pub fn jiffies(&self) -> Result<u32, ClockError> {
        let Some(prog) = &self.prog else {
            return Err(ClockError::Run(io::Error::from(io::ErrorKind::Unsupported)));
        };
        let data = [0u8; 64];
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.test.prog_fd = prog.as_raw_fd() as u32;
        attr.test.data_in = data.as_ptr() as u64;
        attr.test.data_size_in = data.len() as u32;
        attr.test.repeat = 1;
        bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr).map_err(ClockError::Run)?;
        // SAFETY: the kernel filled in the TEST_RUN member.
        Ok(unsafe { attr.test.retval })
    }

    pub fn hz(&self) -> u32 {
        self.hz
    }

    /// Seconds as jiffies, saturating.
    pub fn to_jiffies(&self, secs: u64) -> u32 {
        secs.saturating_mul(self.hz as u64).min(u32::MAX as u64 / 2) as u32
    }

    /// Jiffies as whole seconds.
    pub fn to_secs(&self, jiffies: u32) -> u64 {
        jiffies as u64 / self.hz as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_advances_at_hz() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "needs root and CI=true forbids skipping");
            return;
        }
        let c = Clock::new().expect("clock");
        let (a0, j0, b0) = (Instant::now(), c.jiffies().unwrap(), Instant::now());
        std::thread::sleep(Duration::from_millis(300));
        let (a1, j1, b1) = (Instant::now(), c.jiffies().unwrap(), Instant::now());
        // Against the time that did pass (a loaded machine oversleeps), bracketed by each
        // read, within the four ticks `measure_hz` allows (a busy machine updates jiffies a
        // few ticks late).
        let (d, hz) = (j1.wrapping_sub(j0) as f64, c.hz() as f64);
        let (low, high) = (hz * (a1 - b0).as_secs_f64() - 4.0, hz * (b1 - a0).as_secs_f64() + 4.0);
        assert!((low..=high).contains(&d), "{d} jiffies, expected {low:.1}..{high:.1} at HZ={hz}");
        assert_eq!(c.to_jiffies(2), 2 * c.hz());
        assert_eq!(c.to_secs(3 * c.hz() + 1), 3);
    }
}
