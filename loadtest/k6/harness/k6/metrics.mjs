import { record } from './record.mjs';

class Metric {
  constructor(name) {
    this.name = name;
    record.metrics[name] = [];
  }

  add(value) {
    record.metrics[this.name].push(Number(value));
  }
}

export class Counter extends Metric {}
export class Gauge extends Metric {}
export class Rate extends Metric {}
export class Trend extends Metric {}

export default { Counter, Gauge, Rate, Trend };
